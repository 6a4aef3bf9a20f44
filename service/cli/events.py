"""The event store from the shell: ``tfdeploy events`` (every event in order, or one deploy's;
``--follow``) and ``projections rebuild`` (the read models recomputed from the events).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from service.cli.database import database
from service.cli.text import safe
from service.settings import Settings


def format_event(e: Any) -> str:
    data = {k: v for k, v in e.data.items() if v not in (None, "", [], {})}
    if e.type == "Requested":
        data["files"] = sorted(data.get("files", {}))
    detail = " ".join(f"{k}={v}" for k, v in data.items())
    stream = e.deploy_id[:8] if e.stream == "deploy" else f"ws:{e.deploy_id[:5]}"
    return safe(
        f"{e.recorded_at:%Y-%m-%d %H:%M:%S} #{e.position:<6} {stream} v{e.version:<3} "
        f"{e.type:<15} {e.actor:<22} {detail}"
    )


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    from service import store

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            after = 0
            while True:
                page = await store.audit_page(conn, after=after, limit=500, deploy_id=args.deploy)
                for e in page:
                    print(format_event(e), flush=True)
                if page:
                    after = page[-1].position
                if len(page) == 500:
                    continue
                if not args.follow:
                    return 0
                await conn.execute("LISTEN tfdeploy_events")
                gen = conn.notifies(timeout=5.0)
                async for _ in gen:
                    break
                await conn.execute("UNLISTEN tfdeploy_events")

    with database(settings, quiet=True) as db:
        try:
            return asyncio.run(go(db.url))
        except KeyboardInterrupt:
            return 0


def cmd_projections(settings: Settings, args: argparse.Namespace) -> int:
    from service import store

    async def go(url: str) -> int:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
            n = await store.rebuild_projections(conn)
        print(f"rebuilt {n} deploy(s) from their events")
        return 0

    with database(settings, quiet=True) as db:
        return asyncio.run(go(db.url))
