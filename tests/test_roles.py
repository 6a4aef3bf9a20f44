"""Roles on every endpoint: who may call what, and what everyone else gets.

- no token, a bad one or a revoked one: 401 on every route but the open ones (/health, /metrics,
  the status page and its static files, the OpenAPI document);
- a user on an admin-only route: 403;
- a user naming another user's deploy or workspace: 404 (the same as an unknown one);
- a revoked token is refused on its very next request, Server-Sent Event streams included;
- admin replay: admin only, failed deploys only, exactly one of concurrent replays wins, and the
  Retried event names the admin.

The route table below must list every route the app serves (test_every_route_is_classified), so
a new endpoint cannot arrive without its role rules being tested.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.api.app import create_app
from service.auth import create_token, revoke_token
from service.deploys import NewDeploy
from service.lifecycle import (
    AttemptFailed,
    AttemptSucceeded,
    Cancel,
    IllegalTransition,
    PersistedState,
    Replay,
    StartAttempt,
)
from service.services import Services

MAIN_TF = 'resource "null_resource" "x" {}\n'
UNKNOWN = "00000000-0000-4000-8000-000000000000"

# (method, path template) -> who may call it. "open": anyone; "user": any valid token (owner
# rules apply to the ids in it); "admin": an admin token.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): "open",
    ("GET", "/metrics"): "open",
    ("GET", "/"): "open",
    ("GET", "/static/{name:str}"): "open",
    ("GET", "/schema"): "open",
    ("GET", "/schema/scalar"): "open",
    ("GET", "/schema/openapi.json"): "open",
    ("GET", "/schema/openapi.yml"): "open",
    ("GET", "/schema/openapi.yaml"): "open",
    ("GET", "/schema/{path:str}"): "open",
    ("POST", "/deploys"): "user",
    ("GET", "/deploys"): "user",
    ("GET", "/deploys/{deploy_id:str}"): "user",
    ("GET", "/deploys/{deploy_id:str}/events"): "user",
    ("GET", "/deploys/{deploy_id:str}/logs"): "user",
    ("GET", "/deploys/{deploy_id:str}/stream"): "user",
    ("POST", "/deploys/{deploy_id:str}/cancel"): "user",
    ("POST", "/deploys/{deploy_id:str}/replay"): "admin",
    ("GET", "/workspaces/{name:str}/state"): "user",
    ("GET", "/workspaces/{name:str}/states"): "user",
    ("GET", "/workspaces/{name:str}/states/{version:int}"): "user",
    ("GET", "/events"): "user",
    ("GET", "/events/stream"): "admin",
}
COUNTED_TABLES = ("events", "deploys", "deploy_inputs", "idempotency_keys", "procrastinate_jobs")


def concrete(path: str, deploy_id: str, workspace: str) -> str:
    return (
        path.replace("{deploy_id:str}", deploy_id)
        .replace("{name:str}", workspace)
        .replace("{version:int}", "1")
        .replace("{path:str}", "openapi.json")
    )


def guarded_routes() -> list[tuple[str, str]]:
    return sorted(route for route, role in ROUTES.items() if role != "open")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def deploy(
    services: Services, owner: str, *, workspace: str = "default", max_attempts: int = 1
) -> str:
    new = NewDeploy(
        workspace=workspace, action="apply", files={"main.tf": MAIN_TF}, max_attempts=max_attempts
    )
    view, _ = await services.deploys.request(new, owner=owner, actor=f"user:{owner}")
    return view.id


async def fail(services: Services, deploy_id: str) -> None:
    await services.deploys.execute(deploy_id, StartAttempt(worker="w1"), "worker:w1")
    await services.deploys.execute(
        deploy_id, AttemptFailed(reason="apply_failed", message="boom"), "worker:w1"
    )


def persisted(workspace: str, version: int = 1) -> PersistedState:
    return PersistedState(
        workspace=workspace,
        store="postgres",
        location="postgres",
        serial=version,
        lineage="l",
        sha256="0" * 64,
        size=2,
        state_version=version,
    )


async def counts(services: Services) -> dict[str, int]:
    out = {}
    async with services.pool.connection() as conn:
        for table in COUNTED_TABLES:
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            out[table] = row[0] if row else 0
    return out


def assert_error(response: httpx.Response, status: int, what: str = "") -> None:
    assert response.status_code == status, (what, response.status_code, response.text)
    body = response.json()
    assert body["status_code"] == status and isinstance(body["detail"], str), what


# ---------------------------------------------------------------- the route table


async def test_every_route_is_classified(services: Services) -> None:
    app = create_app(services)
    served = {
        (method, route.path)
        for route in app.routes
        for method in route.methods  # type: ignore[attr-defined]
        if method not in ("OPTIONS", "HEAD")
    }
    assert served == set(ROUTES), (
        f"unclassified: {sorted(served - set(ROUTES))}, gone: {sorted(set(ROUTES) - served)}"
    )


# ---------------------------------------------------------------- 401


async def test_no_bad_or_malformed_token_is_401_on_every_guarded_route(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    anns = await deploy(services, "ann")
    before = await counts(services)
    variants: list[tuple[str, dict[str, str], dict[str, str]]] = [
        ("no token", {}, {}),
        ("unknown token", bearer("tfd_not-a-token"), {}),
        ("empty bearer", {"Authorization": "Bearer "}, {}),
        ("another scheme", {"Authorization": f"Basic {tokens['ann']}"}, {}),
        ("unknown access_token", {}, {"access_token": "tfd_not-a-token"}),
    ]
    for method, template in guarded_routes():
        url = concrete(template, anns, "default")
        for name, headers, params in variants:
            body = {"files": {"main.tf": MAIN_TF}} if method == "POST" else None
            response = await client.request(method, url, headers=headers, params=params, json=body)
            assert_error(response, 401, f"{name}: {method} {url}")
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert await counts(services) == before  # nothing written by any refused request


async def test_open_routes_need_no_token(services: Services, client: httpx.AsyncClient) -> None:
    for (method, template), role in sorted(ROUTES.items()):
        if role != "open":
            continue
        url = concrete(template, UNKNOWN, "default")
        if template == "/static/{name:str}":
            url = "/static/app.js"
        response = await client.request(method, url)
        assert response.status_code == 200, (url, response.status_code, response.text[:200])


# ---------------------------------------------------------------- 403


async def test_admin_only_routes_are_403_for_users_and_write_nothing(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    anns = await deploy(services, "ann")
    await fail(services, anns)  # replayable: only the role stands in the way
    before = await counts(services)
    admin_only = [route for route, role in ROUTES.items() if role == "admin"]
    assert admin_only
    for method, template in admin_only:
        url = concrete(template, anns, "default")
        # Bearer header and ?access_token= alike, by the deploy's owner and by another user.
        for response in (
            await client.request(method, url, headers=bearer(tokens["ann"])),
            await client.request(method, url, params={"access_token": tokens["ann"]}),
        ):
            assert_error(response, 403, f"{method} {url}")
        if "{deploy_id" not in template:
            assert_error(await client.request(method, url, headers=bearer(tokens["bob"])), 403)
    assert await counts(services) == before
    # The admin may.
    response = await client.post(f"/deploys/{anns}/replay", headers=bearer(tokens["root"]))
    assert response.status_code == 202, response.text


# ---------------------------------------------------------------- 404


async def test_another_users_deploy_or_workspace_is_404_on_every_route_that_names_one(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    anns = await deploy(services, "ann", workspace="anns-ws")
    await deploy(services, "bob", workspace="bobs-ws")
    before = await counts(services)
    named = [
        (method, template)
        for (method, template), role in ROUTES.items()
        if role != "open" and ("{deploy_id" in template or "{name" in template)
    ]
    assert len(named) == 9
    for method, template in named:
        url = concrete(template, anns, "anns-ws")
        # bob: ann's deploy / workspace is not his; an unknown id and a malformed one look the same.
        for as_bob in (
            url,
            concrete(template, UNKNOWN, "no-such-ws"),
            concrete(template, "nope", "x"),
        ):
            response = await client.request(method, as_bob, headers=bearer(tokens["bob"]))
            assert_error(response, 404, f"bob: {method} {as_bob}")
    assert await counts(services) == before
    # ann and the admin do find her deploy (whatever else they then get).
    for user in ("ann", "root"):
        got = await client.get(f"/deploys/{anns}", headers=bearer(tokens[user]))
        assert got.status_code == 200
    # Lists and the audit query leave other users' deploys out rather than refusing.
    listed = (await client.get("/deploys", headers=bearer(tokens["bob"]))).json()["items"]
    assert anns not in {d["id"] for d in listed}
    audit = await client.get("/events", headers=bearer(tokens["bob"]), params={"deploy_id": anns})
    assert audit.status_code == 200 and audit.json()["items"] == []
    audit = await client.get(
        "/events", headers=bearer(tokens["bob"]), params={"workspace": "anns-ws"}
    )
    assert audit.status_code == 200 and audit.json()["items"] == []


# ---------------------------------------------------------------- revoked tokens


async def test_a_revoked_token_is_refused_at_once_everywhere_sse_included(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    async with services.pool.connection() as conn:
        boss = await create_token(conn, "boss", admin=True)
    anns = await deploy(services, "ann")
    await fail(services, anns)
    # Both work up to the revocation...
    assert (await client.get(f"/deploys/{anns}", headers=bearer(tokens["ann"]))).status_code == 200
    assert (await client.get("/events", headers=bearer(boss))).status_code == 200
    async with services.pool.connection() as conn:
        assert await revoke_token(conn, "ann") == 1
        assert await revoke_token(conn, "boss") == 1
    before = await counts(services)
    # ... and from the very next request on, nothing does: no cache holds a token.
    for token in (tokens["ann"], boss):
        for method, template in guarded_routes():
            url = concrete(template, anns, "default")
            body = {"files": {"main.tf": MAIN_TF}} if method == "POST" else None
            by_header = await client.request(method, url, headers=bearer(token), json=body)
            assert_error(by_header, 401, f"{method} {url}")
            by_query = await client.request(method, url, params={"access_token": token}, json=body)
            assert_error(by_query, 401, f"{method} {url}?access_token")
    assert await counts(services) == before
    # Both SSE routes, as an EventSource would connect (?access_token=, Last-Event-ID).
    for url in (f"/deploys/{anns}/stream", "/events/stream"):
        response = await client.get(
            url, params={"access_token": boss}, headers={"Last-Event-ID": "1"}
        )
        assert_error(response, 401, url)
    # Other tokens are untouched.
    assert (await client.get(f"/deploys/{anns}", headers=bearer(tokens["root"]))).status_code == 200


# ---------------------------------------------------------------- replay rules


async def test_replay_by_a_user_is_403_and_appends_nothing(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    anns = await deploy(services, "ann")
    await fail(services, anns)
    before = await counts(services)
    assert_error(await client.post(f"/deploys/{anns}/replay", headers=bearer(tokens["ann"])), 403)
    assert_error(await client.post(f"/deploys/{anns}/replay", headers=bearer(tokens["bob"])), 404)
    assert await counts(services) == before
    assert (await services.deploys.get(anns)).status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["queued", "deploying", "retrying", "succeeded", "cancelled"])
async def test_replay_of_a_deploy_that_is_not_failed_is_409(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient, status: str
) -> None:
    d = await deploy(services, "ann", max_attempts=2)
    worker = "worker:w1"
    if status in ("deploying", "retrying", "succeeded"):
        await services.deploys.execute(d, StartAttempt(worker="w1"), worker)
    if status == "retrying":
        await services.deploys.execute(d, AttemptFailed(reason="apply_failed"), worker)
    if status == "succeeded":
        await services.deploys.execute(d, AttemptSucceeded(state=persisted("default")), worker)
    if status == "cancelled":
        await services.deploys.execute(d, Cancel(by="user:ann"), "user:ann")
    assert (await services.deploys.get(d)).status == status  # type: ignore[union-attr]
    before = await counts(services)
    response = await client.post(f"/deploys/{d}/replay", headers=bearer(tokens["root"]))
    assert_error(response, 409)
    assert status in response.json()["detail"]
    assert await counts(services) == before


async def test_replay_records_the_admin_and_grants_a_fresh_budget(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    d = await deploy(services, "ann", max_attempts=1)
    await fail(services, d)
    jobs_before = (await counts(services))["procrastinate_jobs"]
    response = await client.post(f"/deploys/{d}/replay", headers=bearer(tokens["root"]))
    assert response.status_code == 202, response.text
    body = response.json()
    budget = services.settings.max_attempts
    assert (
        body["status"] == "retrying" and body["attempt"] == 2 and body["max_attempts"] == 1 + budget
    )
    events = await services.deploys.stream(d)
    last = events[-1]
    assert last.type == "Retried" and last.actor == "admin:root"
    assert last.data["by"] == "admin" and last.data["attempt"] == 2
    assert last.data["max_attempts"] == 1 + budget
    # The next attempt is queued in the same transaction, on the workspace's lock, so it starts
    # from the workspace's latest state (the worker's part, tested with the runners).
    assert (await counts(services))["procrastinate_jobs"] == jobs_before + 1
    # The audit trail shows who replayed.
    audit = await client.get(
        "/events", headers=bearer(tokens["root"]), params={"type": "Retried", "actor": "admin:root"}
    )
    assert [e["deploy_id"] for e in audit.json()["items"]] == [d]


async def test_concurrent_replays_over_http_exactly_one_wins(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    async with services.pool.connection() as conn:
        other_admin = await create_token(conn, "ops", admin=True)
    for _round in range(3):
        d = await deploy(services, "ann")
        await fail(services, d)
        responses = await asyncio.gather(
            *(
                client.post(f"/deploys/{d}/replay", headers=bearer(token))
                for token in (tokens["root"], other_admin) * 3
            )
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202, 409, 409, 409, 409, 409], codes
        events = await services.deploys.stream(d)
        assert [e.type for e in events].count("Retried") == 1
        winner = next(r for r in responses if r.status_code == 202)
        assert events[-1].actor in ("admin:root", "admin:ops")
        assert winner.json()["version"] == events[-1].version


async def test_concurrent_replays_in_the_command_handler_exactly_one_wins(
    services: Services,
) -> None:
    d = await deploy(services, "ann")
    await fail(services, d)

    async def replay(i: int) -> str:
        try:
            await services.deploys.execute(d, Replay(by=f"admin:a{i}", budget=2), f"admin:a{i}")
            return "won"
        except IllegalTransition:
            return "refused"

    outcomes = await asyncio.gather(*(replay(i) for i in range(8)))
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    retried = [e for e in await services.deploys.stream(d) if e.type == "Retried"]
    assert len(retried) == 1 and retried[0].actor.startswith("admin:a")
