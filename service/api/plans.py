"""A deploy's plan under review: read it, approve it, discard it (``/deploys/{id}/plan``,
``/approve``, ``/discard``; the plan flow is docs/execution.md, "Plans and approval").

Every route resolves the deploy through ``service.api.access`` (a malformed id, an unknown id and
a deploy the caller may not see are all 404); approve and discard are for whoever may deploy to
its workspace, once (``service.planning.command``; idempotent with an ``Idempotency-Key``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Response, get, post

from service import planning, store
from service.api import access
from service.api.auth import SECURITY
from service.api.deploys import DEPLOY_ID, IDEMPOTENCY_KEY, check_idempotency_key
from service.api.schemas import DeployOut, error_responses
from service.auth import Principal
from service.deploys import NotFound
from service.services import Services


class PlanSummaryOut(msgspec.Struct, frozen=True, kw_only=True):
    """Terraform's counts: a replace is one to add and one to destroy; reads are not counted."""

    add: int
    change: int
    destroy: int


class PlanChangeOut(msgspec.Struct, frozen=True, kw_only=True):
    address: str
    type: str
    actions: list[str]  # terraform's: ["create"], ["update"], ["delete", "create"], ["read"] ...
    tainted: bool  # replaced because an earlier apply left it tainted


class PlanOut(msgspec.Struct, frozen=True, kw_only=True):
    """The latest plan of a deploy: addresses, types and actions only, never a value. Unchanged
    resources are left out."""

    summary: PlanSummaryOut
    changes: list[PlanChangeOut]
    attempt: int  # the attempt that made it
    changed: bool  # anything to apply at all
    awaits_approval: bool  # it waits (or waited) for a person
    base_state_version: int | None  # the workspace's state version it was made against

    @classmethod
    def of(cls, planned: Any) -> PlanOut:
        return cls(
            summary=PlanSummaryOut(
                add=planned.summary.add, change=planned.summary.change, destroy=planned.summary.destroy
            ),
            changes=[
                PlanChangeOut(address=c.address, type=c.type, actions=list(c.actions), tainted=c.tainted)
                for c in planned.changes
            ],
            attempt=planned.attempt,
            changed=planned.changed,
            awaits_approval=planned.awaits_approval,
            base_state_version=planned.base_state_version,
        )


class PlanController(Controller):
    path = "/deploys"
    tags = ["deploys"]
    security = SECURITY

    @get(
        "/{deploy_id:str}/plan",
        summary="The deploy's latest plan (addresses, types and actions; no values)",
        responses=error_responses(400, 404),
        description="404 until the deploy has made a plan.",
    )
    async def plan(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
    ) -> PlanOut:
        deploy = await access.visible_deploy(services, principal, deploy_id)
        async with services.pool.connection() as conn:
            stream = await store.read_stream(conn, deploy.id)
        planned = planning.plan_of(stream)
        if planned is None:
            raise NotFound("the deploy has no plan yet")
        return PlanOut.of(planned)

    @post(
        "/{deploy_id:str}/approve",
        status_code=202,
        summary="Approve a planned deploy: apply exactly its saved plan",
        responses=error_responses(403, 404, 409, 422),
        description=(
            "Whoever may deploy to the workspace (its owner, a `deploy` member, an admin). 409 "
            "when the deploy is not `planned` (approved already, discarded, ...) or its plan is "
            "stale (the workspace's state changed since it was made); of concurrent approvals "
            "exactly one wins. With an `Idempotency-Key`, a retry of the same request answers "
            "202 with the deploy (header `Idempotent-Replayed: true`)."
        ),
    )
    async def approve(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> Response[DeployOut]:
        return await self._plan_command(services, principal, deploy_id, "approve", idempotency_key)

    @post(
        "/{deploy_id:str}/discard",
        status_code=202,
        summary="Discard a planned deploy: it ends `discarded`, nothing is applied",
        responses=error_responses(403, 404, 409, 422),
        description=(
            "Whoever may deploy to the workspace. 409 when the deploy is not `planned`. "
            "Idempotent with an `Idempotency-Key`, like approve."
        ),
    )
    async def discard(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str = DEPLOY_ID,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> Response[DeployOut]:
        return await self._plan_command(services, principal, deploy_id, "discard", idempotency_key)

    async def _plan_command(
        self,
        services: Services,
        principal: Principal,
        deploy_id: str,
        name: str,
        key: str | None,
    ) -> Response[DeployOut]:
        check_idempotency_key(key)
        deploy = await access.actionable_deploy(services, principal, deploy_id)
        view, acted = await planning.command(
            services.deploys,
            deploy,
            name,
            by=principal.actor,
            actor=principal.actor,
            owner=principal.name,
            key=key,
        )
        headers = {} if acted else {"Idempotent-Replayed": "true"}
        return Response(DeployOut.of(view), status_code=202, headers=headers)
