"""Deploys from the shell, recorded as ``admin:<actor>``: ``tfdeploy replay`` (a failed deploy, or
every one, queued again with a fresh attempt budget), ``approve`` and ``discard`` (a planned
deploy's plan).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from service.cli.database import database, services_for
from service.cli.text import safe
from service.settings import Settings


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg

    from service import store
    from service.api.errors import INPUTS_REMOVED_SQLSTATE
    from service.deploys import NotFound
    from service.lifecycle import IllegalTransition, Replay

    actor = f"admin:{args.actor}"

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=4) as services:
            if args.failed:
                since = datetime.now(UTC) - args.since if args.since else None
                ids: list[str] = []
                cursor = None
                async with services.pool.connection() as conn:
                    while True:
                        page = await store.list_deploys(conn, status="failed", cursor=cursor, limit=200)
                        ids += [d.id for d in page if since is None or d.updated_at >= since]
                        if len(page) < 200:
                            break
                        cursor = (page[-1].created_at, page[-1].id)
            else:
                if not args.id:
                    print("give a deploy id or --failed", file=sys.stderr)
                    return 2
                ids = [args.id]
            status = 0
            for deploy_id in ids:
                try:
                    _, view = await services.deploys.execute(
                        deploy_id, Replay(by=actor, budget=settings.max_attempts), actor
                    )
                    print(f"{deploy_id} {view.status} (attempt {view.attempt} of {view.max_attempts})")
                except (IllegalTransition, NotFound) as exc:
                    print(f"{deploy_id}: {exc or 'not found'}", file=sys.stderr)
                    status = 1
                except psycopg.DatabaseError as exc:
                    if exc.sqlstate != INPUTS_REMOVED_SQLSTATE:
                        raise
                    print(f"{deploy_id}: its files and variables were removed by retention; "
                          "it cannot run again", file=sys.stderr)
                    status = 1
            if args.failed and not ids:
                print("no failed deploys")
            return status

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))


def cmd_plan_command(settings: Settings, args: argparse.Namespace) -> int:
    """``approve ID`` / ``discard ID``: a planned deploy's plan, from the shell, recorded as
    ``admin:<actor>`` (the shell's user) like ``replay``."""
    from uuid import UUID

    from service import planning
    from service.deploys import NotFound
    from service.lifecycle import IllegalTransition

    actor = f"admin:{args.actor}"
    try:
        deploy_id = str(UUID(args.id))
    except ValueError:
        print(f"{safe(args.id)}: not a deploy id", file=sys.stderr)
        return 2

    async def go(url: str) -> int:
        async with services_for(settings, url, pool_size=2) as services:
            view = await services.deploys.get(deploy_id)
            try:
                if view is None:
                    raise NotFound(deploy_id)
                view, _ = await planning.command(
                    services.deploys, view, args.command, by=actor, actor=actor, owner=actor
                )
            except (IllegalTransition, NotFound) as exc:
                print(f"{deploy_id}: {exc if isinstance(exc, IllegalTransition) else 'not found'}",
                      file=sys.stderr)
                return 1
            print(f"{deploy_id} {view.status} (attempt {view.attempt} of {view.max_attempts})")
            return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))
