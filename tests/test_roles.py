"""Roles on every endpoint: who may call what, and what everyone else gets.

The full table (issue #11): every route the app serves x (the workspace's owner, a ``read``
member, a ``deploy`` member, another user, an admin, no token, an expired token), the expected
status in each cell, checked against the app served over HTTP, and nothing written by a refused
request. The rules it checks (service.api.access, docs/workspaces.md):

- no token, an unknown, revoked or expired one, or a disabled user's: 401 on every route but the
  open ones (/health, the status page and its static files, the OpenAPI document);
- another user naming a deploy or a workspace that is not theirs to see: 404, the same as an
  unknown one;
- a member who may see but not do (a ``read`` member deploying, a member managing members), or a
  user on an admin-only route: 403;
- admin replay: admin only, failed deploys only, exactly one of concurrent replays wins, and the
  Retried event names the admin;
- terraform's state backend (``.../tfstate``): read with the workspace, lock, unlock and write as
  one who may deploy to it, force-unlock (UNLOCK with no body) as an admin; LOCK and UNLOCK are
  the same routes as POST and DELETE on ``.../tfstate/lock``; a 401 there asks for Basic auth.

MATRIX must list every route the app serves (test_every_route_is_classified), so a new endpoint
cannot arrive without its cells.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest
import uvicorn

from service import workspaces
from service.api.app import create_app
from service.api.tfstate import LOCK_METHODS
from service.auth import create_token, create_user_token, list_tokens, revoke_token
from service.deploys import NewDeploy
from service.events import PlanChange, PlanSummary
from service.lifecycle import (
    AttemptFailed,
    AttemptSucceeded,
    Cancel,
    Discard,
    IllegalTransition,
    PersistedState,
    PlanMade,
    Replay,
    StartAttempt,
)
from service.services import Services
from service.statestores import index, make_state_store

MAIN_TF = 'resource "null_resource" "x" {}\n'
UNKNOWN = "00000000-0000-4000-8000-000000000000"
WHO = ("owner", "reader", "deployer", "other", "admin", "none", "expired")
# Tokens of the cast: ann owns ann:prod, rita reads it, dave deploys to it, otto is a stranger.
USERS = {"owner": "ann", "reader": "rita", "deployer": "dave", "other": "otto", "admin": "root"}


def row(owner: int, reader: int, deployer: int, other: int, admin: int) -> dict[str, int]:
    """Expected statuses; no token and an expired one are always 401."""
    return {
        "owner": owner,
        "reader": reader,
        "deployer": deployer,
        "other": other,
        "admin": admin,
        "none": 401,
        "expired": 401,
    }


OPEN = dict.fromkeys(WHO, 200)
READ = row(200, 200, 200, 404, 200)  # whoever may read the workspace
DEPLOY = row(202, 403, 202, 404, 202)  # whoever may deploy to it
MANAGE = row(200, 403, 403, 404, 200)  # its owner and admins
ANY_USER = row(200, 200, 200, 200, 200)
ADMIN = row(403, 403, 403, 403, 200)
CLI = row(200, 403, 200, 404, 200)  # terraform's state backend: whoever may deploy
# UNLOCK with the ID of a lock ann's terraform holds: hers to release; anyone else who may deploy
# gets 409 with her LockInfo (an admin force-unlocks with an empty body instead).
UNLOCK_ANNS = row(200, 403, 409, 404, 409)
LOCK_PATH = "/workspaces/{name:str}/tfstate/lock"

# (method, path template) -> the expected status of each caller. The deploy in the paths is ann's
# (in ann:prod), failed; the workspace is ann:prod.
MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/health"): OPEN,
    ("GET", "/"): OPEN,
    ("GET", "/static/{name:str}"): OPEN,
    ("GET", "/schema"): OPEN,
    ("GET", "/schema/openapi.json"): OPEN,
    ("GET", "/schema/openapi.yml"): OPEN,
    ("GET", "/schema/openapi.yaml"): OPEN,
    ("GET", "/schema/{path:str}"): OPEN,
    ("GET", "/metrics"): ADMIN,  # open with TFDEPLOY_METRICS_PUBLIC=true (test_tenants.py)
    ("POST", "/deploys"): DEPLOY,  # to ann:prod
    ("GET", "/deploys"): READ,  # ?workspace=ann:prod
    ("GET", "/deploys/{deploy_id:str}"): READ,
    ("GET", "/deploys/{deploy_id:str}/events"): READ,
    ("GET", "/deploys/{deploy_id:str}/logs"): READ,
    ("GET", "/deploys/{deploy_id:str}/stream"): READ,
    ("POST", "/deploys/{deploy_id:str}/cancel"): DEPLOY,  # a queued deploy of ann:prod
    # An admin's; another user does not even see the deploy.
    ("POST", "/deploys/{deploy_id:str}/replay"): row(403, 403, 403, 404, 202),
    # A planned deploy of ann:prod: its plan is read like the deploy, approved or discarded by
    # whoever may deploy to the workspace.
    ("GET", "/deploys/{deploy_id:str}/plan"): READ,
    ("POST", "/deploys/{deploy_id:str}/approve"): DEPLOY,
    ("POST", "/deploys/{deploy_id:str}/discard"): DEPLOY,
    ("GET", "/workspaces"): ANY_USER,  # each sees what they may (checked below)
    ("GET", "/workspaces/{name:str}/state"): READ,
    ("GET", "/workspaces/{name:str}/states"): READ,
    ("GET", "/workspaces/{name:str}/states/{version:int}"): READ,
    ("GET", "/workspaces/{name:str}/outputs"): READ,
    ("GET", "/workspaces/{name:str}/resources"): READ,
    ("GET", "/workspaces/{name:str}/members"): MANAGE,
    ("PUT", "/workspaces/{name:str}/members/{user:str}"): MANAGE | {"owner": 201, "admin": 201},
    ("DELETE", "/workspaces/{name:str}/members/{user:str}"): MANAGE | {"owner": 204, "admin": 204},
    ("GET", "/workspaces/{name:str}/tfstate"): READ,
    ("POST", "/workspaces/{name:str}/tfstate"): CLI,  # the next serial of ann's state
    ("POST", LOCK_PATH): CLI,  # ann:prod not locked
    ("LOCK", LOCK_PATH): CLI,
    ("DELETE", LOCK_PATH): UNLOCK_ANNS,
    ("UNLOCK", LOCK_PATH): UNLOCK_ANNS,
    ("GET", "/events"): READ,  # ?workspace=ann:prod
    ("GET", "/events/stream"): ADMIN,
}
# The classes other suites use (tests/test_hostile_input.py): "open", "user" (any valid token;
# the rules above apply to the ids in it), "admin".
ROUTES: dict[tuple[str, str], str] = {
    route: "open" if cells is OPEN else "admin" if cells["owner"] == cells["deployer"] == 403 else "user"
    for route, cells in MATRIX.items()
}
COUNTED_TABLES = (
    "events",
    "deploys",
    "deploy_inputs",
    "idempotency_keys",
    "procrastinate_jobs",
    "workspaces",
    "workspace_members",
    "workspace_locks",
    "state_versions",
)
STATE = (
    b'{"version": 4, "terraform_version": "1.11.4", "serial": 3, "lineage": "l", '
    b'"outputs": {"url": {"value": "https://x", "type": "string"}, '
    b'"password": {"value": "hunter2", "type": "string", "sensitive": true}}, '
    b'"resources": [{"mode": "managed", "type": "terraform_data", "name": "web", '
    b'"provider": "provider[\\"terraform.io/builtin/terraform\\"]", '
    b'"instances": [{"schema_version": 0, "attributes": {"input": "hunter2"}}]}]}'
)


def concrete(path: str, deploy_id: str, workspace: str, user: str = "bob") -> str:
    return (
        path.replace("{deploy_id:str}", deploy_id)
        .replace("{name:str}", workspace)
        .replace("{version:int}", "1")
        .replace("{path:str}", "openapi.json")
        .replace("{user:str}", user)
    )


def guarded_routes() -> list[tuple[str, str]]:
    return sorted(route for route, role in ROUTES.items() if role != "open")


def challenge(template: str) -> str:
    """The scheme a 401 asks for: Basic on terraform's state backend, Bearer elsewhere."""
    return "Basic" if "/tfstate" in template else "Bearer"


def _md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


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


async def planned(services: Services, owner: str, *, workspace: str, base: int | None) -> str:
    """A deploy that waits for approval of a plan made against state version ``base``."""
    new = NewDeploy(
        workspace=workspace, action="apply", files={"main.tf": MAIN_TF}, max_attempts=1,
        auto_approve=False,
    )
    view, _ = await services.deploys.request(new, owner=owner, actor=f"user:{owner}")
    await services.deploys.execute(view.id, StartAttempt(worker="w1"), "worker:w1")
    await services.deploys.execute(
        view.id,
        PlanMade(
            summary=PlanSummary(add=1),
            changes=[PlanChange(address="null_resource.x", type="null_resource", actions=["create"])],
            plan_sha256="ab" * 32,
            plan_id=str(uuid4()),
            base_state_version=base,
        ),
        "worker:w1",
    )
    return view.id


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
            row_ = await cur.fetchone()
            out[table] = row_[0] if row_ else 0
    return out


def assert_error(response: httpx.Response, status: int, what: str = "") -> None:
    assert response.status_code == status, (what, response.status_code, response.text)
    body = response.json()
    assert body["status_code"] == status and isinstance(body["detail"], str), what


@pytest.fixture
async def served(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app behind uvicorn on a free loopback port (streams need a real server),
    served from this event loop."""
    app = create_app(services)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            yield client
    finally:
        server.should_exit = True
        await task
        sock.close()


# ---------------------------------------------------------------- the route table


async def test_every_route_is_classified(services: Services) -> None:
    app = create_app(services)
    served = {
        (method, route.path)
        for route in app.routes
        for method in route.methods  # type: ignore[attr-defined]
        if method not in ("OPTIONS", "HEAD")
    }
    # LOCK and UNLOCK reach the POST and DELETE of the lock path (service.api.tfstate).
    served |= {
        (alias, path)
        for method, path in served
        for alias, target in LOCK_METHODS.items()
        if method == target and path.endswith("/tfstate/lock")
    }
    assert served == set(MATRIX), (
        f"unclassified: {sorted(served - set(MATRIX))}, gone: {sorted(set(MATRIX) - served)}"
    )


@dataclass
class Cast:
    tokens: dict[str, str | None]  # who -> token (None: no token)
    prod: workspaces.Workspace  # ann:prod
    failed: str  # ann's failed deploy in ann:prod


@pytest.fixture
async def cast(services: Services, tokens: dict[str, str]) -> Cast:
    """ann's workspace prod (a failed deploy, a state with outputs), rita a read member, dave a
    deploy member, otto a stranger, root the admin, and an expired token of ann's."""
    async with services.pool.connection() as conn:
        extra = {name: await create_token(conn, name) for name in ("rita", "dave", "otto")}
        expired = await create_user_token(
            conn, "ann", expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
    failed = await deploy(services, "ann", workspace="prod")
    await fail(services, failed)
    async with services.pool.connection() as conn:
        prod = await workspaces.find(conn, "ann", "prod")
    assert prod is not None
    await workspaces.set_member(services.pool, prod, "rita", "read", "user:ann")
    await workspaces.set_member(services.pool, prod, "dave", "deploy", "user:ann")
    serial, lineage, sha, size = index.state_meta(STATE)
    store_ = make_state_store(services.settings, services.pool)
    async with services.pool.connection() as conn, conn.transaction():
        version = await index.next_version(conn, prod.id)
        stored = await store_.put(prod.id, version, STATE, sha)
        await index.record_version(conn, prod.id, version, failed, 1, stored, serial, lineage, sha, size)
    all_tokens = {role: ({**tokens, **extra})[user] for role, user in USERS.items()}
    return Cast(tokens={**all_tokens, "none": None, "expired": expired}, prod=prod, failed=failed)


async def _call(
    client: httpx.AsyncClient, method: str, url: str, token: str | None, **kw: Any
) -> httpx.Response:
    headers = {**(bearer(token) if token else {}), **kw.pop("headers", {})}
    if url.endswith("/stream"):
        # Read the answer's head (and, for an open stream, its first message), then hang up.
        async with client.stream(method, url, headers=headers, **kw) as response:
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        break
            else:
                await response.aread()
            return response
    return await client.request(method, url, headers=headers, **kw)


async def test_every_route_for_every_caller(
    services: Services, cast: Cast, served: httpx.AsyncClient
) -> None:
    """The table, cell by cell: each caller's status on each route, and a refused request writes
    nothing. Cells that change something get a fresh object each (a queued deploy to cancel, a
    failed one to replay, a member to remove), so every cell sees the same world."""

    async def queued() -> str:
        return await deploy(services, "ann", workspace="prod")

    async def failed() -> str:
        d = await deploy(services, "ann", workspace="prod")
        await fail(services, d)
        return d

    async def bob_is(role: str | None) -> None:
        if role is None:
            await workspaces.remove_member(services.pool, cast.prod, "bob", "user:ann")
        else:
            await workspaces.set_member(services.pool, cast.prod, "bob", role, "user:ann")  # type: ignore[arg-type]

    # route -> what to prepare, and the request's keyword arguments
    prepare: dict[tuple[str, str], Callable[[], Awaitable[tuple[str, dict[str, Any]]]]] = {}

    async def plain(route: tuple[str, str]) -> tuple[str, dict[str, Any]]:
        return concrete(route[1], cast.failed, "ann:prod"), {}

    for route in MATRIX:
        prepare[route] = lambda route=route: plain(route)  # type: ignore[misc]

    async def post_deploy() -> tuple[str, dict[str, Any]]:
        return "/deploys", {"json": {"workspace": "ann:prod", "files": {"main.tf": MAIN_TF}}}

    async def cancel() -> tuple[str, dict[str, Any]]:
        return f"/deploys/{await queued()}/cancel", {}

    async def replay() -> tuple[str, dict[str, Any]]:
        return f"/deploys/{await failed()}/replay", {}

    async def plan_route(verb: str) -> tuple[str, dict[str, Any]]:
        d = await planned(services, "ann", workspace="prod", base=1)  # prod is at version 1
        return f"/deploys/{d}/{verb}", {}

    async def add_member() -> tuple[str, dict[str, Any]]:
        await bob_is(None)
        return "/workspaces/ann:prod/members/bob", {"json": {"role": "read"}}

    async def remove_member() -> tuple[str, dict[str, Any]]:
        await bob_is("deploy")
        return "/workspaces/ann:prod/members/bob", {}

    async def with_query(path: str) -> tuple[str, dict[str, Any]]:
        return path, {"params": {"workspace": "ann:prod"}}

    async def static() -> tuple[str, dict[str, Any]]:
        return "/static/app.js", {}

    async def set_cli_lock(holder: str | None) -> None:
        # A plan the plan routes left waiting would hold the workspace (LOCK and writes: 423).
        async with services.pool.connection() as conn:
            cur = await conn.execute("SELECT id::text FROM deploys WHERE status = 'planned'")
            waiting = [r[0] for r in await cur.fetchall()]
        for d in waiting:
            await services.deploys.execute(d, Discard(by="admin:root"), "admin:root")
        async with services.pool.connection() as conn:
            await conn.execute("DELETE FROM workspace_locks")
            if holder is not None:
                await conn.execute(
                    "INSERT INTO workspace_locks (workspace_id, lock_id, info, holder)"
                    " VALUES (%s, 'anns-lock', '{\"ID\": \"anns-lock\"}', %s)",
                    (cast.prod.id, holder),
                )

    def lock_info(lock_id: str) -> dict[str, Any]:
        body = json.dumps({"ID": lock_id, "Operation": "OperationTypeApply", "Who": "x@y"}).encode()
        return {"content": body, "headers": {"Content-MD5": _md5(body)}}

    async def lock() -> tuple[str, dict[str, Any]]:
        await set_cli_lock(None)
        return "/workspaces/ann:prod/tfstate/lock", lock_info(f"lock-{uuid.uuid4()}")

    async def unlock() -> tuple[str, dict[str, Any]]:
        await set_cli_lock("ann")
        return "/workspaces/ann:prod/tfstate/lock", lock_info("anns-lock")

    async def write_state() -> tuple[str, dict[str, Any]]:
        await set_cli_lock(None)
        async with services.pool.connection() as conn:
            latest = await index.latest(conn, cast.prod.id)
        assert latest is not None
        body = STATE.replace(b'"serial": 3', f'"serial": {latest.serial + 1}'.encode())
        return "/workspaces/ann:prod/tfstate", {"content": body, "headers": {"Content-MD5": _md5(body)}}

    prepare |= {
        ("POST", "/deploys"): post_deploy,
        ("POST", "/deploys/{deploy_id:str}/cancel"): cancel,
        ("POST", "/deploys/{deploy_id:str}/replay"): replay,
        ("GET", "/deploys/{deploy_id:str}/plan"): lambda: plan_route("plan"),
        ("POST", "/deploys/{deploy_id:str}/approve"): lambda: plan_route("approve"),
        ("POST", "/deploys/{deploy_id:str}/discard"): lambda: plan_route("discard"),
        ("PUT", "/workspaces/{name:str}/members/{user:str}"): add_member,
        ("DELETE", "/workspaces/{name:str}/members/{user:str}"): remove_member,
        ("GET", "/deploys"): lambda: with_query("/deploys"),
        ("GET", "/events"): lambda: with_query("/events"),
        ("GET", "/static/{name:str}"): static,
        ("POST", "/workspaces/{name:str}/tfstate"): write_state,
        ("POST", LOCK_PATH): lock,
        ("LOCK", LOCK_PATH): lock,
        ("DELETE", LOCK_PATH): unlock,
        ("UNLOCK", LOCK_PATH): unlock,
    }
    wrong: list[str] = []
    for route, cells in sorted(MATRIX.items()):
        for who in WHO:
            url, kw = await prepare[route]()
            before = await counts(services)
            response = await _call(served, route[0], url, cast.tokens[who], **kw)
            if response.status_code != cells[who]:
                wrong.append(f"{who}: {route[0]} {url}: {response.status_code} {response.text[:120]}")
                continue
            if response.status_code >= 400:
                body = response.json()
                assert body["status_code"] == response.status_code, (who, route)
                assert await counts(services) == before, (who, route)  # nothing written
                if response.status_code == 401:
                    assert response.headers["www-authenticate"].startswith(challenge(route[1]))
    assert not wrong, "\n".join(wrong)


async def test_what_each_caller_sees_in_lists_and_the_audit(
    services: Services, cast: Cast, served: httpx.AsyncClient
) -> None:
    """The lists leave out what a caller may not see instead of refusing: GET /workspaces, GET
    /deploys, GET /events. A workspace's own stream (created, member changes, state downloads) is
    its owner's and the admins'; members see its deploys' events."""
    others = await deploy(services, "otto", workspace="prod")  # otto's own prod
    got = await _call(served, "GET", "/workspaces/ann:prod/state", cast.tokens["reader"])
    assert got.status_code == 200  # a download by rita: in ann:prod's stream

    async def listed(who: str, path: str, **params: str) -> Any:
        response = await _call(served, "GET", path, cast.tokens[who], params=params)
        assert response.status_code == 200, (who, path, response.text)
        return response.json()["items"]

    for who, role in (("owner", "owner"), ("reader", "read"), ("deployer", "deploy"), ("admin", "admin")):
        spaces = {w["ref"]: w for w in await listed(who, "/workspaces")}
        assert spaces["ann:prod"]["role"] == role
        assert spaces["ann:prod"]["latest_deploy"]["id"] == cast.failed
        assert spaces["ann:prod"]["latest_state"]["version"] == 1
        assert ("otto:prod" in spaces) == (who == "admin")
        deploys = {d["id"] for d in await listed(who, "/deploys")}
        assert cast.failed in deploys and (others in deploys) == (who == "admin")
        events = await listed(who, "/events", workspace="ann:prod")
        kinds = {(e["stream"], e["type"]) for e in events}
        assert ("deploy", "Requested") in kinds
        owner_or_admin = who in ("owner", "admin")
        for fact in ("WorkspaceCreated", "MemberSet", "StateDownloaded"):
            assert (("workspace", fact) in kinds) == owner_or_admin, (who, fact)
        assert {e["workspace_id"] for e in events} == {cast.prod.id}
    assert [w["ref"] for w in await listed("other", "/workspaces")] == ["otto:prod"]
    assert {d["id"] for d in await listed("other", "/deploys")} == {others}
    assert cast.failed not in {e["deploy_id"] for e in await listed("other", "/events")}
    downloads = [
        e for e in await listed("owner", "/events", type="StateDownloaded") if e["actor"] == "user:rita"
    ]
    assert [e["data"]["state_version"] for e in downloads] == [1]


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
        # A good token in the query string counts on the two stream routes only.
        ("access_token off the streams", {}, {"access_token": tokens["root"]}),
    ]
    for method, template in guarded_routes():
        url = concrete(template, anns, "default")
        for name, headers, params in variants:
            if name == "access_token off the streams" and url.endswith("/stream"):
                continue
            body = {"files": {"main.tf": MAIN_TF}} if method in ("POST", "PUT") else None
            response = await client.request(method, url, headers=headers, params=params, json=body)
            assert_error(response, 401, f"{name}: {method} {url}")
            assert response.headers["www-authenticate"].startswith(challenge(template))
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
    assert len(admin_only) == 3
    for method, template in admin_only:
        url = concrete(template, anns, "default")
        responses = [await client.request(method, url, headers=bearer(tokens["ann"]))]
        if url.endswith("/stream"):  # ?access_token= too, as EventSource sends it
            responses.append(await client.request(method, url, params={"access_token": tokens["ann"]}))
        for response in responses:
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
    assert len(named) == 23
    for method, template in named:
        url = concrete(template, anns, "ann:anns-ws")
        body = {"role": "read"} if method == "PUT" else None
        # bob: ann's deploy / workspace is not his; an unknown id and a malformed one look the
        # same; so does "anns-ws", which names bob's own (none) -- except where a request makes
        # one of his own names, as a deploy does (terraform's LOCK and state write).
        makes_own = method in ("POST", "LOCK") and "/tfstate" in template
        for as_bob in (
            url,
            concrete(template, UNKNOWN, "ann:no-such-ws"),
            *([] if makes_own else [concrete(template, anns, "anns-ws"), concrete(template, "nope", "x")]),
        ):
            response = await client.request(method, as_bob, headers=bearer(tokens["bob"]), json=body)
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
    # Naming another user's workspace in a filter is the same 404 as naming none.
    for params in ({"workspace": "ann:anns-ws"}, {"workspace": "ann:nothing"}):
        for path in ("/events", "/deploys"):
            response = await client.get(path, headers=bearer(tokens["bob"]), params=params)
            assert_error(response, 404, f"{path} {params}")
            assert response.json()["detail"] == "workspace not found"


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
        ids = {t["user"]: t["id"] for t in await list_tokens(conn)}
        assert await revoke_token(conn, ids["ann"])
        assert await revoke_token(conn, ids["boss"])
    before = await counts(services)
    # ... and from the very next request on, nothing does: no cache holds a token.
    for token in (tokens["ann"], boss):
        for method, template in guarded_routes():
            url = concrete(template, anns, "default")
            body = {"files": {"main.tf": MAIN_TF}} if method in ("POST", "PUT") else None
            by_header = await client.request(method, url, headers=bearer(token), json=body)
            assert_error(by_header, 401, f"{method} {url}")
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


# ---------------------------------------------------------------- terraform's force-unlock


async def test_force_unlock_is_for_admins_only(
    services: Services, cast: Cast, served: httpx.AsyncClient
) -> None:
    """UNLOCK with an empty body (``terraform force-unlock``) removes whoever's CLI lock: an
    admin's to do; the owner and members who see the workspace are refused (403), anyone else
    learns nothing (404)."""
    expected = row(403, 403, 403, 404, 200)
    for who in WHO:
        async with services.pool.connection() as conn:
            await conn.execute("DELETE FROM workspace_locks")
            await conn.execute(
                "INSERT INTO workspace_locks (workspace_id, lock_id, info, holder)"
                " VALUES (%s, 'daves-lock', '{\"ID\": \"daves-lock\"}', 'dave')",
                (cast.prod.id,),
            )
        before = await counts(services)
        for method in ("UNLOCK", "DELETE"):
            response = await _call(
                served, method, "/workspaces/ann:prod/tfstate/lock", cast.tokens[who], content=b""
            )
            assert response.status_code == expected[who], (who, method, response.text)
            if response.status_code != 200:
                assert await counts(services) == before, (who, method)
            else:
                assert response.json() == {"released": "daves-lock"}
                break
