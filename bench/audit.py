"""The audit query (GET /events) at scale: how long a filtered page takes over 1,000,000 events.

    .venv/bin/python bench/audit.py [--quick] [--events N] [--runs N] [--explain]
                                    [--data-dir DIR] [--database-url URL]

Loads a realistic event history into a throwaway database -- deploys of ~40 users in ~200
workspaces over a year: most succeed at once, some after retries, some fail for good (a few of
those replayed by an admin), some are cancelled, a few lose their state -- with the actors the
service records (``user:<name>``, ``worker:<id>``, ``admin:<name>``). Workspaces are per user;
the seven "team" workspaces belong to their team's lead, and everyone else who deploys to one is
a ``deploy`` member of it (so users' scopes include members' deploys). Then it times pages of the
audit query, each filter alone and combined, the first page and a deep ``after`` page: the
query on one connection as the API runs it (service.api.events.audit_page: never a prepared
statement, so each page is planned for its own filter values), and the whole HTTP route
(``GET /events`` in-process: token check, query, JSON).

Prints p50/p95 per case in milliseconds; figures only, no pass/fail (the target is a page in
under 50 ms). ``--quick`` loads 50,000 events and runs each case fewer times (a CI smoke run).

Without ``--database-url`` it starts its own PostgreSQL (service.embedded) in a temp dir and
removes it afterwards; ``--data-dir DIR`` keeps that cluster and reuses its data on the next
run. With ``--database-url`` (a server you may create databases on) it creates a database
``tfdeploy_bench_<pid>``, and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.embedded import EmbeddedPostgres  # noqa: E402
from service.migrate import migrate  # noqa: E402

USERS = 40
ADMINS = ("root", "ops", "sre")
WORKERS = 8
SPAN_DAYS = 365
T0 = datetime(2025, 1, 1, tzinfo=UTC)
PAGE = 100  # the API's default page; it asks for one more row to know whether a next exists

# ------------------------------------------------------------------ the history's shape

# (type, actor kind, seconds after Requested, data, who "by" names) per step; a deploy's times
# are stretched by a random factor so durations vary.
Step = tuple[str, str, float, dict[str, Any], str | None]


def _req() -> Step:
    return (
        "Requested",
        "user",
        0.0,
        {"max_attempts": 3, "files": {}, "variables": {}, "secret_names": []},
        None,
    )


def _start(attempt: int, at: float) -> Step:
    return ("Started", "worker", at, {"attempt": attempt, "runner": "docker"}, None)


def _persisted(attempt: int, at: float) -> Step:
    data = {
        "attempt": attempt,
        "store": "postgres",
        "location": "postgres",
        "serial": attempt,
        "lineage": "bench",
        "sha256": "0" * 64,
        "size": 1024,
        "state_version": attempt,
    }
    return ("StatePersisted", "worker", at, data, None)


def _failed(attempt: int, at: float, reason: str, final: bool) -> Step:
    data = {
        "attempt": attempt,
        "reason": reason,
        "message": f"{reason} (bench)",
        "exit_code": 1,
        "final": final,
    }
    return ("Failed", "worker", at, data, None)


def _retried(attempt: int, at: float, by: str = "worker", max_attempts: int = 3) -> Step:
    data = {
        "attempt": attempt,
        "max_attempts": max_attempts,
        "by": by,
        "delay_seconds": 10.0 * 2 ** (attempt - 2),
    }
    return ("Retried", "admin" if by == "admin" else "worker", at, data, None)


def _three_failures(reason: str) -> list[Step]:
    return [
        _req(),
        _start(1, 5),
        _failed(1, 90, reason, False),
        _retried(2, 90.1),
        _start(2, 101),
        _failed(2, 190, reason, False),
        _retried(3, 190.1),
        _start(3, 211),
        _failed(3, 300, reason, True),
    ]


# (weight, final status, steps)
SCENARIOS: list[tuple[float, str, list[Step]]] = [
    (
        0.66,
        "succeeded",
        [
            _req(),
            _start(1, 4),
            _persisted(1, 120),
            ("Succeeded", "worker", 120.1, {"attempt": 1}, None),
        ],
    ),
    (
        0.14,
        "succeeded",
        [
            _req(),
            _start(1, 4),
            _failed(1, 80, "apply_failed", False),
            _retried(2, 80.1),
            _start(2, 91),
            _persisted(2, 200),
            ("Succeeded", "worker", 200.1, {"attempt": 2}, None),
        ],
    ),
    (0.045, "failed", _three_failures("apply_failed")),
    (0.015, "failed", _three_failures("timeout")),
    (0.01, "failed", _three_failures("runner_error")),
    (
        0.02,
        "succeeded",
        [
            *_three_failures("apply_failed"),
            _retried(4, 5000, by="admin", max_attempts=6),
            _start(4, 5003),
            _persisted(4, 5100),
            ("Succeeded", "worker", 5100.1, {"attempt": 4}, None),
        ],
    ),
    (0.035, "cancelled", [_req(), ("Cancelled", "user", 30, {"attempt": None}, "user")]),
    (
        0.03,
        "cancelled",
        [
            _req(),
            _start(1, 4),
            ("CancelRequested", "user", 40, {}, "user"),
            _persisted(1, 45),
            ("Cancelled", "worker", 45.1, {"attempt": 1}, "user"),
        ],
    ),
    (
        0.01,
        "cancelled",
        [
            _req(),
            _start(1, 4),
            ("CancelRequested", "admin", 600, {}, "admin"),
            _persisted(1, 610),
            ("Cancelled", "worker", 610.1, {"attempt": 1}, "admin"),
        ],
    ),
    (
        0.0145,
        "failed",
        [
            _req(),
            _start(1, 4),
            (
                "Destroyed",
                "worker",
                150,
                {"attempt": 1, "reason": "state_not_persisted", "message": ""},
                None,
            ),
            _failed(1, 150.1, "state_not_persisted", True),
        ],
    ),
    (
        0.0005,
        "failed",
        [
            _req(),
            _start(1, 4),
            (
                "StateRescued",
                "worker",
                170,
                {
                    "attempt": 1,
                    "location": "state_emergency:1",
                    "sha256": "0" * 64,
                    "message": "destroy failed",
                },
                None,
            ),
            _failed(1, 170.1, "state_not_persisted", True),
        ],
    ),
]


def events_per_deploy() -> float:
    total = sum(w for w, _, _ in SCENARIOS)
    return sum(w * len(steps) for w, _, steps in SCENARIOS) / total


# ------------------------------------------------------------------ loading

LOAD_SQL = """
SELECT setseed(0.4242);

CREATE TEMP TABLE bench_scenarios (scenario int PRIMARY KEY, lo float8, hi float8, status text,
                                   steps int);
CREATE TEMP TABLE bench_steps (scenario int, step int, type text, actor_kind text, at_s float8,
                               data jsonb, by_kind text);
"""

DEPLOYS_SQL = """
CREATE TEMP TABLE bench_deploys AS
SELECT g.n,
       md5('bench-deploy-' || g.n)::uuid AS id,
       'user' || g.u AS owner,
       CASE WHEN g.r_team < 0.1 THEN 'team-' || (g.u %% 7)
            ELSE 'ws-' || g.u || '-' || floor(g.r_ws * (1 + g.u %% 6))::int END AS workspace,
       -- a team workspace belongs to its lead; the others are their deployer's own
       'user' || CASE WHEN g.r_team < 0.1 THEN g.u %% 7 ELSE g.u END AS ws_owner,
       CASE WHEN g.r_action < 0.05 THEN 'destroy' ELSE 'apply' END AS action,
       s.scenario, s.status, s.steps,
       %(t0)s::timestamptz + (g.n::float8 / %(deploys)s) * %(span)s * interval '1 day'
           + g.r_jitter * interval '10 minutes' AS start_at,
       0.3 + 3 * g.r_factor AS factor
FROM (SELECT n,
             floor(%(users)s * power(random(), 2))::int AS u,
             random() AS r_team, random() AS r_ws, random() AS r_action, random() AS r_pick,
             random() AS r_jitter, random() AS r_factor
      FROM generate_series(1, %(deploys)s) AS n) AS g
JOIN bench_scenarios s ON g.r_pick >= s.lo AND g.r_pick < s.hi;
"""

WORKSPACES_SQL = """
ALTER TABLE bench_deploys ADD COLUMN workspace_id uuid;
UPDATE bench_deploys SET workspace_id = md5('bench-ws-' || ws_owner || ':' || workspace)::uuid;
INSERT INTO users (name)
SELECT owner FROM bench_deploys UNION SELECT ws_owner FROM bench_deploys
ON CONFLICT DO NOTHING;
INSERT INTO workspaces (id, owner, name, created_at)
SELECT DISTINCT ON (workspace_id) workspace_id, ws_owner, workspace, start_at
FROM bench_deploys ORDER BY workspace_id, start_at;
INSERT INTO workspace_members (workspace_id, user_name, role)
SELECT DISTINCT workspace_id, owner, 'deploy' FROM bench_deploys WHERE owner <> ws_owner;
"""

EVENTS_SQL = """
INSERT INTO events (deploy_id, version, type, data, actor, recorded_at)
SELECT id, step, type, data, actor, recorded_at FROM (
    SELECT d.id, st.step, st.type,
           st.data
             || CASE st.type
                  WHEN 'Requested' THEN jsonb_build_object(
                      'workspace', d.workspace, 'owner', d.owner, 'action', d.action,
                      'workspace_id', d.workspace_id, 'workspace_owner', d.ws_owner)
                  WHEN 'StatePersisted' THEN jsonb_build_object('workspace', d.workspace_id)
                  WHEN 'Started' THEN jsonb_build_object(
                      'worker', 'w' || ((d.n + (st.data->>'attempt')::int) %% %(workers)s))
                  ELSE '{}'::jsonb END
             || CASE st.by_kind
                  WHEN 'user' THEN jsonb_build_object('by', 'user:' || d.owner)
                  WHEN 'admin' THEN jsonb_build_object('by', 'admin:' || (%(admins)s::text[])[1 + d.n %% 3])
                  ELSE '{}'::jsonb END AS data,
           CASE st.actor_kind
             WHEN 'user' THEN 'user:' || d.owner
             WHEN 'admin' THEN 'admin:' || (%(admins)s::text[])[1 + d.n %% 3]
             ELSE 'worker:w' || ((d.n + coalesce((st.data->>'attempt')::int, 1)) %% %(workers)s)
           END AS actor,
           d.start_at + st.at_s * d.factor * interval '1 second' AS recorded_at
    FROM bench_deploys d JOIN bench_steps st USING (scenario)
    ORDER BY recorded_at, d.id, st.step
    LIMIT %(events)s
) AS e
ORDER BY recorded_at, id, step;
"""

READ_MODEL_SQL = """
INSERT INTO deploys (id, owner, workspace, action, status, attempt, max_attempts,
                     cancel_requested, state_version, error_reason, error_message, version,
                     created_at, updated_at, workspace_id, workspace_owner)
SELECT d.id, d.owner, d.workspace, d.action,
       CASE WHEN e.version = d.steps THEN d.status ELSE 'deploying' END,
       1, 3, false, NULL, NULL, NULL, e.version, e.created_at, e.updated_at, d.workspace_id,
       d.ws_owner
FROM bench_deploys d
JOIN (SELECT deploy_id, max(version) AS version, min(recorded_at) AS created_at,
             max(recorded_at) AS updated_at
      FROM events GROUP BY deploy_id) AS e ON e.deploy_id = d.id;
"""


def load(url: str, target: int) -> float:
    """Fill an empty, migrated database with ``target`` events; returns the seconds it took."""
    began = time.perf_counter()
    deploys = int(target / events_per_deploy() * 1.02) + 10  # a little extra, cut at ``target``
    total = sum(w for w, _, _ in SCENARIOS)
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(LOAD_SQL.encode())
            lo = 0.0
            for i, (weight, status, steps) in enumerate(SCENARIOS):
                hi = 1.0 if i == len(SCENARIOS) - 1 else lo + weight / total
                conn.execute(
                    "INSERT INTO bench_scenarios VALUES (%s, %s, %s, %s, %s)",
                    (i, lo, hi, status, len(steps)),
                )
                lo = hi
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO bench_steps VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        [
                            (i, v, type_, kind, at, json.dumps(data), by)
                            for v, (type_, kind, at, data, by) in enumerate(steps, start=1)
                        ],
                    )
            params = {
                "deploys": deploys,
                "users": USERS,
                "span": SPAN_DAYS,
                "t0": T0,
                "workers": WORKERS,
                "admins": list(ADMINS),
                "events": target,
            }
            conn.execute(DEPLOYS_SQL, params)
            conn.execute(WORKSPACES_SQL.encode())
            # A bulk load: no NOTIFY per row (nobody listens to a throwaway database).
            conn.execute("ALTER TABLE events DISABLE TRIGGER events_notify")
            conn.execute(EVENTS_SQL, params)
            conn.execute("ALTER TABLE events ENABLE TRIGGER events_notify")
            conn.execute(READ_MODEL_SQL)
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute("VACUUM (ANALYZE) deploys")
    return time.perf_counter() - began


def event_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0


# ------------------------------------------------------------------ the cases


class Case:
    def __init__(self, name: str, filters: dict[str, Any], owner: str | None = None) -> None:
        self.name, self.filters, self.owner = name, filters, owner


def pick_cases(url: str) -> list[Case]:
    """Filters drawn from the data: typical and extreme values of each, then combinations."""
    with psycopg.connect(url) as conn:

        def one(sql: str, *args: Any) -> Any:
            row = conn.execute(sql, args).fetchone()
            return row[0] if row else None

        max_pos = one("SELECT max(position) FROM events")
        t_first = one("SELECT min(recorded_at) FROM events")
        t_last = one("SELECT max(recorded_at) FROM events")
        busiest_deploy = one(
            "SELECT deploy_id FROM events WHERE type = 'Retried' AND data->>'by' = 'admin' "
            "ORDER BY position DESC LIMIT 1"
        ) or one("SELECT deploy_id FROM events ORDER BY position DESC LIMIT 1")
        by_owner = conn.execute(
            "SELECT owner, count(*) FROM deploys GROUP BY owner ORDER BY 2 DESC"
        ).fetchall()
        by_ws = conn.execute(
            "SELECT workspace_owner || ':' || workspace, count(*) FROM deploys"
            " GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    top_owner, rare_owner = by_owner[0][0], by_owner[-1][0]
    mid_owner = by_owner[len(by_owner) // 2][0]
    top_ws, mid_ws = by_ws[0][0], by_ws[len(by_ws) // 2][0]
    week_ago = t_last - timedelta(days=7)
    mid = t_first + (t_last - t_first) / 2
    day = (mid, mid + timedelta(days=1))
    rare_ws_of_top = f"{top_owner}:ws-{top_owner.removeprefix('user')}-0"
    cases = [
        Case("no filter (admin)", {}),
        Case("deploy_id", {"deploy_id": str(busiest_deploy)}),
        Case(f"workspace (largest: {top_ws})", {"workspace": top_ws}),
        Case(f"workspace (median: {mid_ws})", {"workspace": mid_ws}),

        Case("type=Failed", {"type": "Failed"}),
        Case("type=StateRescued (rare)", {"type": "StateRescued"}),
        Case("actor=worker:w3", {"actor": "worker:w3"}),
        Case("actor=admin:root (rare)", {"actor": "admin:root"}),
        Case(f"actor=user:{rare_owner} (rare)", {"actor": f"user:{rare_owner}"}),
        Case("since=last 7 days", {"since": week_ago}),
        Case("since+until=one day mid-year", {"since": day[0], "until": day[1]}),
        Case("until=first week", {"until": t_first + timedelta(days=7)}),
        Case(f"as user {top_owner} (busiest)", {}, owner=top_owner),
        Case(f"as user {mid_owner} (median)", {}, owner=mid_owner),
        Case(f"as user {rare_owner} (rarest)", {}, owner=rare_owner),
        Case(f"as user {top_owner}: type=Failed", {"type": "Failed"}, owner=top_owner),
        Case(f"as user {rare_owner}: type=Cancelled", {"type": "Cancelled"}, owner=rare_owner),
        Case(
            f"as user {top_owner}: workspace {rare_ws_of_top}",
            {"workspace": rare_ws_of_top},
            owner=top_owner,
        ),
        Case(f"as user {mid_owner}: since last 7 days", {"since": week_ago}, owner=mid_owner),
        Case("workspace+type=Failed", {"workspace": mid_ws, "type": "Failed"}),
        Case("type=Retried+actor=admin:ops", {"type": "Retried", "actor": "admin:ops"}),
        Case("actor=worker:w3+one day", {"actor": "worker:w3", "since": day[0], "until": day[1]}),
        Case("workspace+since last 7 days", {"workspace": top_ws, "since": week_ago}),
        Case(
            "type+actor+workspace+since+until",
            {
                "type": "Failed",
                "actor": "worker:w1",
                "workspace": top_ws,
                "since": t_first,
                "until": t_last,
            },
        ),
        Case(
            "deploy_id+type+actor",
            {"deploy_id": str(busiest_deploy), "type": "Started", "actor": "worker:w1"},
        ),
        # Hard ones: common filters whose combination matches nothing or little.
        Case(
            f"type=Failed+actor=user:{top_owner} (none)",
            {"type": "Failed", "actor": f"user:{top_owner}"},
        ),
        Case(f"as user {top_owner}: type=StateRescued", {"type": "StateRescued"}, owner=top_owner),
        Case(f"as user {mid_owner}: actor=admin:ops", {"actor": "admin:ops"}, owner=mid_owner),
        Case(
            f"as user {mid_owner}: one day, type=Retried",
            {"since": day[0], "until": day[1], "type": "Retried"},
            owner=mid_owner,
        ),
    ]
    for case in cases:
        case.filters.setdefault("after", 0)
    deep = []
    for case in cases:
        deep.append(Case(case.name, {**case.filters, "after": int(max_pos * 0.75)}, case.owner))
    return cases + deep


# ------------------------------------------------------------------ timing


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> tuple[list[float], Any]:
    out: list[float] = []
    result: Any = None
    for _ in range(runs):
        began = time.perf_counter()
        result = await fn()
        out.append((time.perf_counter() - began) * 1000)
    return out, result


WORKSPACE_IDS: dict[str, str] = {}  # ref -> id, filled by measure()


def explain_params(case: Case) -> dict[str, Any]:
    """The query's parameters as GET /events makes them: a workspace ref becomes its id (and
    its own stream's events for its owner and admins); a user is the viewer."""
    f = case.filters
    ref = f.get("workspace")
    return {
        "after": f.get("after", 0),
        "limit": PAGE + 1,
        "deploy_id": f.get("deploy_id"),
        "workspace_id": WORKSPACE_IDS[ref] if ref else None,
        "workspace_stream": bool(ref) and (case.owner is None or ref.startswith(f"{case.owner}:")),
        "type": f.get("type"),
        "actor": f.get("actor"),
        "viewer": case.owner,
        "since": f.get("since"),
        "until": f.get("until"),
    }


async def explain(conn: AsyncConnection[Any], case: Case) -> tuple[float, list[str]]:
    """EXPLAIN ANALYZE of the query as the API runs it (a custom plan, no JIT)."""
    from service.api.events import AUDIT_SETTINGS
    from service.queries import q

    async with conn.transaction():
        await conn.execute(AUDIT_SETTINGS)
        cur = await conn.execute(
            b"EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) " + q("audit_page"), explain_params(case)
        )
        lines = [r[0] for r in await cur.fetchall()]
    execution = next(
        (float(ln.split(":")[1].split()[0]) for ln in lines if ln.startswith("Execution Time")),
        -1.0,
    )
    return execution, lines


async def measure(url: str, cases: list[Case], runs: int, show_plans: bool) -> None:
    import httpx

    from service.api.app import create_app
    from service.api.events import audit_page
    from service.auth import create_token
    from service.services import open_services
    from service.settings import from_env

    settings = from_env(
        {}, data_dir=tempfile.mkdtemp(prefix="tfdeploy-bench-data-"),
        rate_limit="9999999/s",  # timing pages back to back: no per-user limit
    )
    services = await open_services(settings, url, pool_size=2)
    try:
        async with services.pool.connection() as conn:
            tokens = {"admin": await create_token(conn, "bench-admin", admin=True)}
            for case in cases:
                if case.owner and case.owner not in tokens:
                    tokens[case.owner] = await create_token(conn, case.owner)
            cur = await conn.execute("SELECT owner || ':' || name, id::text FROM workspaces")
            WORKSPACE_IDS.update(dict(await cur.fetchall()))
        app = create_app(services)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        transport = httpx.ASGITransport(app=app)
        header = f"{'case':<48} {'after':>6} {'rows':>5} {'query p50':>9} {'p95':>7} {'http p50':>9} {'p95':>7} {'plan ms':>8}"
        print(header)
        print("-" * len(header))
        worst_sql: list[float] = []
        worst_http: list[float] = []
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
            await AsyncConnection.connect(url) as conn,
        ):
            for case in cases:
                params = explain_params(case)
                kwargs = {k: v for k, v in params.items() if k not in ("after", "limit")}

                async def sql_page(
                    params: dict[str, Any] = params, kwargs: dict[str, Any] = kwargs
                ) -> Any:
                    # As GET /events runs it (service.api.events.audit_page: never prepared).
                    return await audit_page(
                        conn, after=params["after"], limit=params["limit"], **kwargs
                    )

                query = {
                    k: (v.isoformat() if isinstance(v, datetime) else v)
                    for k, v in case.filters.items()
                }
                query["limit"] = PAGE
                headers = {"Authorization": f"Bearer {tokens[case.owner or 'admin']}"}

                async def http_page(
                    query: dict[str, Any] = query, headers: dict[str, str] = headers
                ) -> Any:
                    response = await client.get("/events", params=query, headers=headers)
                    assert response.status_code == 200, response.text
                    return response

                sql_ms, rows = await timed(sql_page, runs)
                http_ms, _ = await timed(http_page, runs)
                plan_ms, plan = await explain(conn, case)
                worst_sql.append(percentile(sql_ms, 0.95))
                worst_http.append(percentile(http_ms, 0.95))
                after = "deep" if params["after"] else "0"
                print(
                    f"{case.name[:48]:<48} {after:>6} {len(rows):>5} "
                    f"{statistics.median(sql_ms):>8.2f} {percentile(sql_ms, 0.95):>7.2f} "
                    f"{statistics.median(http_ms):>9.2f} {percentile(http_ms, 0.95):>7.2f} {plan_ms:>8.2f}",
                    flush=True,
                )
                if show_plans:
                    print("    " + "\n    ".join(plan))
            # The API plans each page for its own values (plan_cache_mode); check none was generic.
            cur = await conn.execute(
                "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) "
                "FROM pg_prepared_statements WHERE statement LIKE '%%cutoff AS MATERIALIZED%%'"
            )
            generic, custom = await cur.fetchone() or (0, 0)
        print("-" * len(header))
        print(
            f"prepared statements on the timing connection: {custom} custom plans, {generic} generic"
        )
        print(
            f"worst p95 over all cases: the query {max(worst_sql):.2f} ms, "
            f"GET /events {max(worst_http):.2f} ms; median of the cases' p95: "
            f"{statistics.median(worst_sql):.2f} ms / {statistics.median(worst_http):.2f} ms"
        )
    finally:
        await services.close()


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 events, fewer runs (CI smoke)")
    parser.add_argument("--events", type=int, help="events to load (default 1,000,000)")
    parser.add_argument("--runs", type=int, help="timed runs per case (default 40, quick 8)")
    parser.add_argument("--explain", action="store_true", help="print each case's plan")
    parser.add_argument("--data-dir", help="keep the embedded cluster here and reuse its data")
    parser.add_argument("--database-url", help="create the throwaway database on this server")
    args = parser.parse_args()
    target = args.events or (50_000 if args.quick else 1_000_000)
    runs = args.runs or (8 if args.quick else 40)

    cleanup: list[Callable[[], None]] = []
    try:
        if args.database_url:
            base, _, _ = args.database_url.rpartition("/")
            name = f"tfdeploy_bench_{__import__('os').getpid()}"
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")

            def drop() -> None:
                with psycopg.connect(args.database_url, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

            cleanup.append(drop)
            url = f"{base}/{name}"
        else:
            directory = (
                Path(args.data_dir)
                if args.data_dir
                else Path(tempfile.mkdtemp(prefix="tfdeploy-bench-pg-"))
            )
            pg = EmbeddedPostgres(directory)
            print(f"starting PostgreSQL in {directory} ...", flush=True)
            was_running = pg.running()
            pg.start()
            if not was_running:  # one left running in --data-dir by someone else stays up
                cleanup.append(lambda: pg.stop("fast"))
            if not args.data_dir:
                cleanup.append(lambda: shutil.rmtree(directory, ignore_errors=True))
            url = pg.owner_url  # it loads events in bulk and migrates: the owner
        applied = migrate(url)
        if applied:
            print(f"migrated: {', '.join(applied)}")
        have = event_count(url)
        if have == 0:
            print(f"loading {target:,} events ...", flush=True)
            seconds = load(url, target)
            have = event_count(url)
            print(f"loaded {have:,} events in {seconds:.1f} s ({have / seconds:,.0f}/s)")
        else:
            print(f"reusing {have:,} events already in the database")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ANALYZE events")
                conn.execute("ANALYZE deploys")
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM deploys), pg_size_pretty(pg_total_relation_size('events'))"
            ).fetchone()
        print(f"{row[0]:,} deploys; events table with its indexes: {row[1]}")
        print(f"page = {PAGE} events; {runs} timed runs per case; times in ms\n")
        asyncio.run(measure(url, pick_cases(url), runs, args.explain))
    finally:
        for fn in reversed(cleanup):
            fn()


if __name__ == "__main__":
    main()
