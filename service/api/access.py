"""Who may do what: every route asks here, and nowhere else.

The rules (docs/workspaces.md has them as a table):

- read a workspace (its state, versions, outputs, resources, deploys and their events, logs and
  streams): an admin, its owner, a ``read`` or ``deploy`` member;
- deploy to it, plan it, and act on its deploys (cancel, approve, discard): an admin, its owner,
  a ``deploy`` member;
- manage its members, and read its own stream (created, member changes, state downloads, CLI
  locks): its owner and admins;
- a user always still sees the deploys they requested themselves (their own history), and may
  cancel them.

Anything else is 404, exactly as if it did not exist: a workspace or deploy one may not see is
never told apart from an unknown one. 403 is only for what one may see but not do (a ``read``
member asking to deploy, a user asking for a replay).
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import msgspec
from psycopg.rows import dict_row

from service import store, workspaces
from service.api.errors import PermissionDenied
from service.auth import Principal
from service.deploys import NotFound
from service.projection import DeployView
from service.queries import q
from service.services import Services
from service.validation import WORKSPACE_NAME, WORKSPACE_REF
from service.workspaces import Workspace, WorkspaceNotFound, parse_ref

# The caller's standing in a workspace; None: none at all (then it does not exist for them).
Standing = Literal["admin", "owner", "deploy", "read"]


# ---------------------------------------------------------------- the rules (pure)


def standing(principal: Principal, owner: str, member_role: str | None) -> Standing | None:
    """What ``principal`` is to a workspace of ``owner`` in which they hold ``member_role``."""
    if owner == principal.name:
        return "owner"
    if principal.admin:
        return "admin"
    if member_role == "deploy":
        return "deploy"
    if member_role == "read":
        return "read"
    return None


def may_read(s: Standing | None) -> bool:
    return s is not None


def may_deploy(s: Standing | None) -> bool:
    return s in ("admin", "owner", "deploy")


def may_manage(s: Standing | None) -> bool:
    """Manage members, and read the workspace's own stream."""
    return s in ("admin", "owner")


def may_see_deploy(principal: Principal, deploy: DeployView, s: Standing | None) -> bool:
    return may_read(s) or deploy.owner == principal.name


def may_cancel(principal: Principal, deploy: DeployView, s: Standing | None) -> bool:
    return may_deploy(s) or deploy.owner == principal.name


def may_act_on_deploy(s: Standing | None) -> bool:
    """Approve or discard a deploy's plan: whoever may deploy to its workspace."""
    return may_deploy(s)


# ---------------------------------------------------------------- resolving refs and ids


class Access(msgspec.Struct, frozen=True, kw_only=True):
    """A workspace as the caller may see it, and their standing in it."""

    workspace: Workspace
    standing: Standing


def _refuse(what: str) -> PermissionDenied:
    return PermissionDenied(f"your role in this workspace does not allow {what}")


async def workspace(
    services: Services, principal: Principal, ref: str, need: str = "read"
) -> Access:
    """The workspace ``ref`` names, if ``principal`` may see it, and may do ``need`` ("read",
    "deploy", "manage"). WorkspaceNotFound (404) when it does not exist or is not theirs to
    see; PermissionDenied (403) when they see it but may not do ``need``."""
    owner, name = parse_ref(ref, principal.name)
    if WORKSPACE_REF.match(ref) is None or WORKSPACE_NAME.match(name) is None:
        raise WorkspaceNotFound()  # no workspace carries such a name: no query
    async with services.pool.connection() as conn:
        found = await workspaces.find_with_role(conn, owner, name, principal.name)
    if found is None:
        raise WorkspaceNotFound()
    ws, role = found
    s = standing(principal, ws.owner, role)
    if not may_read(s):
        raise WorkspaceNotFound()
    assert s is not None
    if need == "deploy" and not may_deploy(s):
        raise _refuse("deploying to it")
    if need == "manage" and not may_manage(s):
        raise _refuse("managing its members")
    return Access(workspace=ws, standing=s)


async def deploy_target(services: Services, principal: Principal, ref: str) -> Workspace | None:
    """The workspace a deploy request names, checked for deploying: None for the caller's own
    name (``Deploys.request`` finds or claims it without an extra round trip); another user's
    workspace otherwise. A name another user owns is never claimed: ``alice:prod`` names
    alice's, ``prod`` the caller's own."""
    owner, _ = parse_ref(ref, principal.name)
    if owner == principal.name:
        return None
    return (await workspace(services, principal, ref, "deploy")).workspace


class DeployAccess(msgspec.Struct, frozen=True, kw_only=True):
    deploy: DeployView
    standing: Standing | None  # in the deploy's workspace


async def deploy(services: Services, principal: Principal, deploy_id: str) -> DeployAccess:
    """The deploy ``deploy_id`` names, if ``principal`` may see it; else NotFound (a malformed
    id, an unknown one and one they may not see all look the same: 404). One round trip."""
    try:
        uid = UUID(deploy_id)
    except ValueError:
        raise NotFound("deploy not found") from None
    async with services.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(q("deploy_access"), {"id": uid, "user": principal.name})
        row = await cur.fetchone()
    if row is None:
        raise NotFound("deploy not found")
    view = store.view_of_row(row)
    s = standing(principal, row["ws_owner"], row["role"]) if row["ws_owner"] is not None else (
        "admin" if principal.admin else None
    )
    if not may_see_deploy(principal, view, s):
        raise NotFound("deploy not found")
    return DeployAccess(deploy=view, standing=s)


async def visible_deploy(services: Services, principal: Principal, deploy_id: str) -> DeployView:
    return (await deploy(services, principal, deploy_id)).deploy


async def cancellable_deploy(services: Services, principal: Principal, deploy_id: str) -> DeployView:
    found = await deploy(services, principal, deploy_id)
    if not may_cancel(principal, found.deploy, found.standing):
        raise _refuse("cancelling its deploys")
    return found.deploy


async def actionable_deploy(services: Services, principal: Principal, deploy_id: str) -> DeployView:
    """A deploy whose plan the caller may approve or discard (403 when they may only see it)."""
    found = await deploy(services, principal, deploy_id)
    if not may_act_on_deploy(found.standing):
        raise _refuse("approving or discarding its plans")
    return found.deploy


async def still_sees_deploy(services: Services, principal: Principal, deploy: DeployView) -> bool:
    """Whether ``principal`` may still see ``deploy`` (an open stream asks now and then: a
    member removed from its workspace stops seeing it at once)."""
    if principal.admin or deploy.owner == principal.name or not deploy.workspace_id:
        return principal.admin or deploy.owner == principal.name
    async with services.pool.connection() as conn:
        found = await workspaces.role_in(conn, deploy.workspace_id, principal.name)
    if found is None:
        return False
    return may_see_deploy(principal, deploy, standing(principal, found[0], found[1]))


def member_name(user: str) -> str:
    """A user name from a path: 404 for one no user may carry (no query). Names made before
    users had rules (tokens of the previous version) are taken as they are."""
    if not 1 <= len(user) <= 64 or not user.isprintable() or ":" in user or " " in user:
        raise NotFound("user not found")
    return user

