"""Open endpoints for operators: ``GET /health`` and ``GET /metrics`` (no token needed)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from psycopg_pool import PoolTimeout

from service.api.schemas import HealthOut
from service.lifecycle import STATUSES
from service.services import Services

HEALTH_TIMEOUT = 3.0
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HEALTH_SQL = "SELECT 1"
# The read model counts deploys by status; the event table has no deletions, so count(*) is the
# total (positions may skip numbers after rolled-back appends, so max(position) would overcount).
DEPLOYS_BY_STATUS_SQL = "SELECT status, count(*) FROM deploys GROUP BY status"
EVENTS_TOTAL_SQL = "SELECT count(*) FROM events"


async def _database_ok(services: Services) -> bool:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            async with services.pool.connection(timeout=HEALTH_TIMEOUT) as conn:
                await conn.execute(HEALTH_SQL)
        return True
    except (psycopg.Error, PoolTimeout, TimeoutError, OSError):
        return False


def _metric(
    lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, Any]]
) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {value}" for labels, value in samples)


class HealthController(Controller):
    path = "/"
    tags = ["operations"]

    @get(
        "/health",
        summary="Liveness and database reachability",
        responses={
            503: ResponseSpec(data_container=HealthOut, description="The database is unreachable.")
        },
    )
    async def health(self, services: Services) -> Response[HealthOut]:
        ok = await _database_ok(services)
        body = HealthOut(
            status="ok" if ok else "unavailable",
            database="ok" if ok else "unreachable",
            state_store=services.settings.state_store,
            runner=services.settings.runner,
        )
        return Response(body, status_code=200 if ok else 503)

    @get("/metrics", summary="Prometheus metrics", media_type=METRICS_MEDIA_TYPE)
    async def metrics(self, services: Services) -> Response[str]:
        lines: list[str] = []
        up = 0
        by_status: dict[str, int] = {}
        events_total: int | None = None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                async with services.pool.connection(timeout=HEALTH_TIMEOUT) as conn:
                    cur = await conn.execute(DEPLOYS_BY_STATUS_SQL)
                    by_status = {status: count for status, count in await cur.fetchall()}
                    cur = await conn.execute(EVENTS_TOTAL_SQL)
                    row = await cur.fetchone()
                    events_total = row[0] if row else 0
            up = 1
        except (psycopg.Error, PoolTimeout, TimeoutError, OSError):
            up = 0
        _metric(
            lines, "tfdeploy_database_up", "gauge", "Whether the database answered.", [("", up)]
        )
        if up:
            statuses = list(STATUSES) + sorted(set(by_status) - set(STATUSES))
            _metric(
                lines,
                "tfdeploy_deploys",
                "gauge",
                "Deploys by current status.",
                [(f'{{status="{s}"}}', by_status.get(s, 0)) for s in statuses],
            )
            _metric(
                lines, "tfdeploy_events_total", "counter", "Events recorded.", [("", events_total)]
            )
        stats = services.pool.get_stats()
        _metric(
            lines,
            "tfdeploy_db_pool_connections",
            "gauge",
            "Connections in the API's database pool.",
            [
                ('{state="open"}', stats.get("pool_size", 0)),
                ('{state="idle"}', stats.get("pool_available", 0)),
            ],
        )
        return Response("\n".join(lines) + "\n", media_type=METRICS_MEDIA_TYPE)
