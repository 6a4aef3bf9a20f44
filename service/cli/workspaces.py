"""Workspaces from the shell: ``tfdeploy workspace contested`` (names several users deployed to
before workspaces had owners) and ``workspace unlock`` (an operator's force-unlock of the
terraform CLI's lock).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from service.cli.database import connect, database, services_for
from service.cli.text import safe, when
from service.settings import Settings


def cmd_workspace(settings: Settings, args: argparse.Namespace) -> int:
    if args.workspace_cmd == "unlock":
        return _workspace_unlock(settings, args)
    from service import workspaces

    async def go(url: str) -> int:
        async with await connect(url) as conn:
            rows = await workspaces.contested(conn)
        if not rows:
            print("no contested workspace")
            return 0
        print(
            "workspace names several users deployed to before the upgrade: each went to its first "
            "deployer;\nthe others below (docs/workspaces.md, 'Contested workspaces')"
        )
        print(f"{'workspace':<40} {'other user':<24} {'deploys':>7}  {'last deploy':<16}  member")
        for r in rows:
            ref = safe(f"{r['owner']}:{r['name']}")
            print(
                f"{ref:<40} {safe(r['other_user']):<24} {r['deploys']:>7}  "
                f"{when(r['last_deploy_at']):<16}  {r['member_role'] or '-'}"
            )
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def _workspace_unlock(settings: Settings, args: argparse.Namespace) -> int:
    """Force-unlock a workspace's CLI lock from the shell (what ``terraform force-unlock`` does
    for an admin): recorded as ``StateForceUnlocked`` by ``admin:<actor>``; the workspace's
    queued deploys then start. A deploy's hold is not the CLI's: cancel the deploy instead."""
    from service import cli_backend, workspaces
    from service.cli_backend_rules import BackendError

    owner, sep, name = args.ref.rpartition(":")
    if not sep or not owner or not name:
        print("name the workspace as owner:name", file=sys.stderr)
        return 2

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=2) as services:
            async with services.pool.connection() as conn:
                ws = await workspaces.find(conn, owner, name)
            if ws is None:
                print(f"no workspace {safe(args.ref)}", file=sys.stderr)
                return 1
            try:
                released = await cli_backend.force_unlock_from_shell(services.pool, ws, args.actor)
            except BackendError as exc:
                print(f"{safe(ws.ref)}: {safe(exc.detail)}", file=sys.stderr)
                return 1
        if released is None:
            print(f"{safe(ws.ref)} was not locked")
        else:
            print(
                f"{safe(ws.ref)} unlocked: lock {safe(released.lock_id)} of "
                f"{safe(released.holder)} (held since {when(released.created_at)}) removed"
            )
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))
