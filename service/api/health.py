"""Endpoints for operators: ``GET /health`` (open) and ``GET /metrics`` (an admin token, unless
``TFDEPLOY_METRICS_PUBLIC=true``: the figures tell who runs how much)."""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

import msgspec
import psycopg
from litestar import Controller, Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from psycopg_pool import PoolTimeout

from service.api.auth import SECURITY, current_principal, require_admin
from service.api.schemas import HealthOut, error_responses
from service.lifecycle import STATUSES
from service.queue import QUEUE_NAME
from service.services import Services

HEALTH_TIMEOUT = 3.0
# Litestar appends "; charset=utf-8" to a text/* media type.
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"

HEALTH_SQL = "SELECT 1"
# What the database knows; every figure is database-wide (the same from every API process).
DEPLOYS_BY_STATUS_SQL = "SELECT status, count(*) FROM deploys GROUP BY status"
# Events appended: the latest global position (an index lookup, where count(*) reads the whole
# table). A rolled-back append leaves a gap, so this can run slightly ahead of the row count.
EVENTS_TOTAL_SQL = "SELECT coalesce(max(position), 0) FROM events"
# Attempts running now (one terraform container or process each): a deploy whose shown attempt
# has started and not ended. Read from the events, so a worker that died mid-attempt is counted
# until its attempt is recorded as failed (worker_lost).
ATTEMPTS_RUNNING_SQL = """
SELECT count(*) FROM deploys d
WHERE d.status IN ('deploying', 'retrying')
  AND EXISTS (SELECT FROM events s
              WHERE s.deploy_id = d.id AND s.type = 'Started'
                AND (s.data->>'attempt')::integer = d.attempt)
"""
# The deploy queue (procrastinate's jobs): ready to run, waiting for a retry delay, taken by a
# worker (which may still be waiting for a slot under TFDEPLOY_MAX_CONCURRENCY).
QUEUE_SQL = """
SELECT count(*) FILTER (WHERE status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())),
       count(*) FILTER (WHERE status = 'todo' AND scheduled_at > now()),
       count(*) FILTER (WHERE status = 'doing')
FROM procrastinate_jobs
WHERE status IN ('todo', 'doing') AND queue_name = %(queue)s
"""
# Workers alive: every worker records a heartbeat every few seconds (service/recovery.py).
WORKERS_SQL = """
SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > now() - interval '30 seconds'
"""
# State-store failures: attempts whose tfstate could not be stored (their resources were then
# destroyed, or the state rescued to state_emergency); partial index from migration 0005.
STATE_FAILURES_SQL = """
SELECT (SELECT count(*) FROM events
        WHERE type = 'Failed' AND data->>'reason' = 'state_not_persisted'),
       (SELECT count(*) FROM events WHERE type = 'StateRescued')
"""
# Attempts that ended after position %(after)s, with their outcome and duration (Started to
# Succeeded, Failed or Cancelled; a Cancelled without an attempt was a queued deploy).
ATTEMPTS_ENDED_SQL = """
SELECT o.position, lower(o.type) AS outcome,
       extract(epoch FROM o.recorded_at - s.recorded_at)::float8 AS seconds
FROM events o
CROSS JOIN LATERAL (
    SELECT x.recorded_at FROM events x
    WHERE x.deploy_id = o.deploy_id AND x.version < o.version AND x.type = 'Started'
    ORDER BY x.version DESC LIMIT 1
) s
WHERE o.position > %(after)s
  AND o.type IN ('Succeeded', 'Failed', 'Cancelled')
  AND o.data->>'attempt' IS NOT NULL
ORDER BY o.position
LIMIT %(limit)s
"""

# Attempt durations, seconds: terraform runs take from seconds to the hour of the default
# TFDEPLOY_DEPLOY_TIMEOUT.
DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
OUTCOMES = ("succeeded", "failed", "cancelled")
ATTEMPTS_PER_SCRAPE = 10_000


class AttemptDurations:
    """The attempt-duration histogram, kept in this process and fed from the event table.

    Each scrape reads the attempts that ended since the last one (positions only grow and commit
    in order, so nothing is missed or counted twice). It starts counting at the first scrape, as
    a Prometheus counter starts at zero when its process starts; the figures are database-wide.
    """

    def __init__(self) -> None:
        self.after: int | None = None  # the last position read; None before the first scrape
        self.counts = {o: [0] * (len(DURATION_BUCKETS) + 1) for o in OUTCOMES}
        self.sums = dict.fromkeys(OUTCOMES, 0.0)
        self.lock = asyncio.Lock()

    async def update(self, conn: Any, events_total: int) -> None:
        async with self.lock:
            if self.after is None:
                self.after = events_total
                return
            while True:
                cur = await conn.execute(
                    ATTEMPTS_ENDED_SQL, {"after": self.after, "limit": ATTEMPTS_PER_SCRAPE}
                )
                rows = await cur.fetchall()
                for position, outcome, seconds in rows:
                    self.after = position
                    if outcome not in self.counts:  # pragma: no cover - the query names three
                        continue
                    seconds = max(float(seconds), 0.0)
                    self.sums[outcome] += seconds
                    self.counts[outcome][bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
                if len(rows) < ATTEMPTS_PER_SCRAPE:
                    return

    def samples(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        for outcome in OUTCOMES:
            running = 0
            for bound, count in zip((*DURATION_BUCKETS, None), self.counts[outcome], strict=True):
                running += count
                le = "+Inf" if bound is None else f"{bound:g}"
                out.append(("_bucket", f'{{outcome="{outcome}",le="{le}"}}', running))
            out.append(("_sum", f'{{outcome="{outcome}"}}', round(self.sums[outcome], 3)))
            out.append(("_count", f'{{outcome="{outcome}"}}', running))
        return out


def attempt_durations(services: Services) -> AttemptDurations:
    found = services.extras.get("attempt_durations")
    if found is None:
        found = services.extras["attempt_durations"] = AttemptDurations()
    return found


class DatabaseFigures(msgspec.Struct, kw_only=True):
    by_status: dict[str, int]
    events_total: int
    attempts_running: int
    queue_ready: int
    queue_scheduled: int
    queue_taken: int
    workers: int
    state_failures: int
    states_rescued: int


async def _one(conn: Any, sql: str, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
    cur = await conn.execute(sql, params)
    row = await cur.fetchone()
    return tuple(row) if row else ()


async def _database_figures(services: Services) -> DatabaseFigures:
    async with services.pool.connection(timeout=HEALTH_TIMEOUT) as conn:
        cur = await conn.execute(DEPLOYS_BY_STATUS_SQL)
        by_status = {status: count for status, count in await cur.fetchall()}
        (events_total,) = await _one(conn, EVENTS_TOTAL_SQL)
        (running,) = await _one(conn, ATTEMPTS_RUNNING_SQL)
        ready, scheduled, taken = await _one(conn, QUEUE_SQL, {"queue": QUEUE_NAME})
        (workers,) = await _one(conn, WORKERS_SQL)
        state_failures, rescued = await _one(conn, STATE_FAILURES_SQL)
        await attempt_durations(services).update(conn, events_total)
    return DatabaseFigures(
        by_status=by_status,
        events_total=events_total,
        attempts_running=running,
        queue_ready=ready,
        queue_scheduled=scheduled,
        queue_taken=taken,
        workers=workers,
        state_failures=state_failures,
        states_rescued=rescued,
    )


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
            # No invented example (service.api.schemas.error_responses says why).
            503: ResponseSpec(
                data_container=HealthOut,
                description="The database is unreachable.",
                generate_examples=False,
            )
        },
    )
    async def health(self, services: Services) -> Response[HealthOut]:
        ok = await _database_ok(services)
        body = HealthOut(
            status="ok" if ok else "unavailable",
            database="ok" if ok else "unreachable",
            state_store=services.settings.state_store,
            # The runner this process's worker uses (tfdeploy up), else the one configured.
            runner=services.extras.get("runner") or services.settings.runner,
        )
        return Response(body, status_code=200 if ok else 503)

    @get(
        "/metrics",
        summary="Prometheus metrics (admin)",
        media_type=METRICS_MEDIA_TYPE,
        security=SECURITY,
        responses=error_responses(403),
        description=(
            "Prometheus text format; docs/operations.md lists them with suggested alerts. Needs "
            "an admin token unless TFDEPLOY_METRICS_PUBLIC=true."
        ),
    )
    async def metrics(self, request: Request[Any, Any, Any], services: Services) -> Response[str]:
        if not services.settings.metrics_public:
            require_admin(await current_principal(request, services), "/metrics")
        lines: list[str] = []
        figures: DatabaseFigures | None = None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                figures = await _database_figures(services)
        except (psycopg.Error, PoolTimeout, TimeoutError, OSError):
            figures = None
        _metric(
            lines,
            "tfdeploy_database_up",
            "gauge",
            "Whether the database answered.",
            [("", int(figures is not None))],
        )
        if figures is not None:
            f = figures
            statuses = list(STATUSES) + sorted(set(f.by_status) - set(STATUSES))
            _metric(
                lines,
                "tfdeploy_deploys",
                "gauge",
                "Deploys by current status.",
                [(f'{{status="{s}"}}', f.by_status.get(s, 0)) for s in statuses],
            )
            _metric(
                lines,
                "tfdeploy_queue_jobs",
                "gauge",
                "Deploy jobs in the queue: ready to run, waiting for a retry delay, taken by a "
                "worker (running, or waiting for a slot under the concurrency cap).",
                [
                    ('{state="ready"}', f.queue_ready),
                    ('{state="scheduled"}', f.queue_scheduled),
                    ('{state="taken"}', f.queue_taken),
                ],
            )
            _metric(
                lines,
                "tfdeploy_attempts_running",
                "gauge",
                "Attempts running now, one terraform container or process each (from the events: "
                "started, not ended).",
                [("", f.attempts_running)],
            )
            _metric(
                lines,
                "tfdeploy_workers",
                "gauge",
                "Workers with a heartbeat in the last 30 seconds.",
                [("", f.workers)],
            )
            _metric(
                lines,
                "tfdeploy_events_total",
                "counter",
                "Events appended (the latest global position).",
                [("", f.events_total)],
            )
            _metric(
                lines,
                "tfdeploy_state_store_failures_total",
                "counter",
                "Attempts whose tfstate could not be stored (failed with state_not_persisted).",
                [("", f.state_failures)],
            )
            _metric(
                lines,
                "tfdeploy_states_rescued_total",
                "counter",
                "States kept only as an emergency copy in PostgreSQL (neither stored nor "
                "destroyed): someone must look.",
                [("", f.states_rescued)],
            )
            histogram = attempt_durations(services)
            name = "tfdeploy_attempt_duration_seconds"
            lines.append(
                f"# HELP {name} Attempt durations, Started to its outcome, of attempts that "
                "ended since this process first served /metrics."
            )
            lines.append(f"# TYPE {name} histogram")
            lines.extend(f"{name}{suffix}{labels} {value}" for suffix, labels, value in histogram.samples())
        hub = services.extras.get("hub")
        _metric(
            lines,
            "tfdeploy_sse_subscribers",
            "gauge",
            "Server-Sent Event streams open on this process.",
            [("", hub.subscriber_count if hub is not None else 0)],
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
