"""Users, owned workspaces and their members (issue #11 parts 1-3, 7; #13.4's outputs and
resources): the claim under concurrency, members who come and go while a deploy runs (open
streams included), tokens that expire or whose user is disabled, the headers every answer
carries, and the outputs and resources of a state. The route table is tests/test_roles.py."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from test_streams import Server, collect, messages, server, stream_url  # noqa: F401 (fixture)

from service import store, workspaces
from service.api.app import create_app
from service.api.streams import StreamOptions
from service.api.workspaces import outputs_of, resources_of
from service.auth import create_token, create_user_token, disable_user
from service.deploys import NewDeploy
from service.lifecycle import AttemptSucceeded, PersistedState, StartAttempt
from service.services import Services
from service.settings import from_env
from service.statestores import index, make_state_store

MAIN_TF = 'resource "terraform_data" "x" {}\n'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(workspace: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"files": {"main.tf": MAIN_TF}}
    if workspace is not None:
        out["workspace"] = workspace
    return out


async def save_state(services: Services, workspace_id: str, deploy_id: str, content: bytes) -> int:
    serial, lineage, sha, size = index.state_meta(content)
    state_store = make_state_store(services.settings, services.pool)
    async with services.pool.connection() as conn, conn.transaction():
        version = await index.next_version(conn, workspace_id)
        stored = await state_store.put(workspace_id, version, content, sha)
        await index.record_version(
            conn, workspace_id, version, deploy_id, 1, stored, serial, lineage, sha, size
        )
    return version


async def workspace_rows(services: Services) -> list[tuple[str, str, str]]:
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT id::text, owner, name FROM workspaces ORDER BY owner, name")
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


async def created_events(services: Services) -> list[tuple[str, str]]:
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT deploy_id::text, data->>'owner' FROM events"
            " WHERE type = 'WorkspaceCreated' AND stream_kind = 'workspace' ORDER BY position"
        )
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


# ---------------------------------------------------------------- the claim


async def test_two_users_deploying_to_one_name_at_once_each_get_their_own(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    for round_ in range(5):
        name = f"prod{round_}"
        answers = await asyncio.gather(
            *(
                client.post("/deploys", headers=bearer(tokens[user]), json=body(name))
                for user in ("ann", "bob") * 3
            )
        )
        assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
        by_user: dict[str, set[str]] = {}
        for a in answers:
            d = a.json()
            assert d["workspace"] == name and d["workspace_owner"] == d["owner"]
            by_user.setdefault(d["owner"], set()).add(d["workspace_id"])
        # One workspace each: ann's prodN is not bob's.
        assert all(len(ids) == 1 for ids in by_user.values())
        assert by_user["ann"] != by_user["bob"]
    rows = await workspace_rows(services)
    assert len(rows) == 10 and len({(o, n) for _, o, n in rows}) == 10
    assert sorted(o for _, o in await created_events(services)) == ["ann"] * 5 + ["bob"] * 5


async def test_one_user_racing_themselves_claims_one_workspace(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    answers = await asyncio.gather(
        *(client.post("/deploys", headers=bearer(tokens["ann"]), json=body("race")) for _ in range(8))
    )
    assert [a.status_code for a in answers] == [202] * 8
    assert len({a.json()["workspace_id"] for a in answers}) == 1
    assert len(await workspace_rows(services)) == 1
    created = await created_events(services)
    assert created == [(answers[0].json()["workspace_id"], "ann")]
    # Every deploy's job is on the one workspace lock, so they run one at a time.
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT lock FROM procrastinate_jobs")
        assert [r[0] for r in await cur.fetchall()] == [f"workspace:{created[0][0]}"]


async def test_no_workspace_means_the_callers_own_default(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    anns = (await client.post("/deploys", headers=bearer(tokens["ann"]), json=body())).json()
    bobs = (await client.post("/deploys", headers=bearer(tokens["bob"]), json=body())).json()
    assert anns["workspace"] == bobs["workspace"] == "default"
    assert anns["workspace_id"] != bobs["workspace_id"]
    # An admin naming someone's workspace that does not exist: 404, nothing claimed for them.
    before = await workspace_rows(services)
    response = await client.post("/deploys", headers=bearer(tokens["root"]), json=body("ann:nope"))
    assert response.status_code == 404 and response.json()["detail"] == "workspace not found"
    assert await workspace_rows(services) == before
    # An admin may deploy to an existing one: it stays ann's.
    ok = await client.post("/deploys", headers=bearer(tokens["root"]), json=body("ann:default"))
    assert ok.status_code == 202
    assert (ok.json()["owner"], ok.json()["workspace_owner"]) == ("root", "ann")
    assert ok.json()["workspace_id"] == anns["workspace_id"]


async def test_a_refs_owner_part_may_be_the_caller(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    first = await client.post("/deploys", headers=bearer(tokens["ann"]), json=body("ann:web"))
    again = await client.post("/deploys", headers=bearer(tokens["ann"]), json=body("web"))
    assert first.status_code == again.status_code == 202
    assert first.json()["workspace_id"] == again.json()["workspace_id"]
    state = await client.get("/workspaces/ann:web/states", headers=bearer(tokens["ann"]))
    assert state.status_code == 200


# ---------------------------------------------------------------- members


async def test_members_put_list_delete_and_their_events(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann, bob = bearer(tokens["ann"]), bearer(tokens["bob"])
    assert (await client.post("/deploys", headers=ann, json=body("prod"))).status_code == 202
    url = "/workspaces/prod/members"
    assert (await client.get(url, headers=ann)).json() == {"workspace": "ann:prod", "owner": "ann", "items": []}
    # bob cannot deploy there yet: it does not exist for him.
    assert (await client.post("/deploys", headers=bob, json=body("ann:prod"))).status_code == 404
    added = await client.put(f"{url}/bob", headers=ann, json={"role": "read"})
    assert added.status_code == 201 and added.json()["role"] == "read"
    # A read member sees it, may not deploy (403: it is visible to him).
    assert (await client.get("/workspaces/ann:prod/states", headers=bob)).status_code == 200
    refused = await client.post("/deploys", headers=bob, json=body("ann:prod"))
    assert refused.status_code == 403
    # Members are the owner's business; "prod" alone names bob's own (none).
    assert (await client.get("/workspaces/ann:prod/members", headers=bob)).status_code == 403
    assert (await client.get(url, headers=bob)).status_code == 404
    changed = await client.put(f"{url}/bob", headers=ann, json={"role": "deploy"})
    assert changed.status_code == 200 and changed.json()["role"] == "deploy"
    same = await client.put(f"{url}/bob", headers=ann, json={"role": "deploy"})
    assert same.status_code == 200  # no change, no event
    theirs = await client.post("/deploys", headers=bob, json=body("ann:prod"))
    assert theirs.status_code == 202
    assert (theirs.json()["owner"], theirs.json()["workspace_owner"]) == ("bob", "ann")
    listed = (await client.get(url, headers=ann)).json()["items"]
    assert [(m["user"], m["role"]) for m in listed] == [("bob", "deploy")]
    # Refusals: the owner as a member, a user that does not exist, a bad role.
    assert (await client.put(f"{url}/ann", headers=ann, json={"role": "read"})).status_code == 422
    assert (await client.put(f"{url}/nobody", headers=ann, json={"role": "read"})).status_code == 404
    assert (await client.put(f"{url}/cat", headers=ann, json={"role": "admin"})).status_code == 400
    assert (await client.delete(f"{url}/bob", headers=ann)).status_code == 204
    assert (await client.delete(f"{url}/bob", headers=ann)).status_code == 404
    assert (await client.get("/workspaces/ann:prod/states", headers=bob)).status_code == 404
    # The admin manages members too.
    assert (await client.put("/workspaces/ann:prod/members/cat", headers=bearer(tokens["root"]), json={"role": "read"})).status_code == 201
    events = (await client.get("/events", headers=ann, params={"workspace": "prod"})).json()["items"]
    facts = [
        (e["type"], e["actor"], e["data"].get("user"), e["data"].get("role"))
        for e in events
        if e["stream"] == "workspace"
    ]
    assert facts == [
        ("WorkspaceCreated", "user:ann", None, None),
        ("MemberSet", "user:ann", "bob", "read"),
        ("MemberSet", "user:ann", "bob", "deploy"),
        ("MemberRemoved", "user:ann", "bob", "deploy"),
        ("MemberSet", "admin:root", "cat", "read"),
    ]
    # bob still sees the deploy he requested there (his own history), not the workspace.
    assert (await client.get(f"/deploys/{theirs.json()['id']}", headers=bob)).status_code == 200


async def test_concurrent_member_changes_each_leave_one_event(services: Services, tokens: dict[str, str]) -> None:
    view, _ = await services.deploys.request(
        NewDeploy(workspace="prod", action="apply", files={"main.tf": MAIN_TF}, max_attempts=1),
        owner="ann",
        actor="user:ann",
    )
    async with services.pool.connection() as conn:
        ws = await workspaces.find(conn, "ann", "prod")
    assert ws is not None
    roles = ["read", "deploy"] * 4
    results = await asyncio.gather(
        *(workspaces.set_member(services.pool, ws, "bob", r, "user:ann") for r in roles)  # type: ignore[arg-type]
    )
    async with services.pool.connection() as conn:
        stream = await store.read_stream(conn, ws.id)
        final = await workspaces.members(conn, ws.id)
    changes = [e for e in stream if e.type == "MemberSet"]
    assert len(changes) == sum(changed for _, changed in results)  # one event per change
    assert changes[-1].data["role"] == final[0].role  # the row and the last event agree
    assert [e.version for e in stream] == list(range(1, len(stream) + 1))
    assert view.workspace_id == ws.id


@pytest.mark.parametrize("stream_options", [StreamOptions(ping=15.0, send_timeout=5.0, auth_recheck=0.2)])
async def test_a_member_removed_while_a_deploy_runs_loses_access_at_once(
    server: Server, services: Services  # noqa: F811
) -> None:
    """dave follows the deploy of ann's workspace he is a member of; ann removes him: his open
    stream ends, his next request is 404; the deploy goes on to its end for ann."""
    async with services.pool.connection() as conn:
        dave = await create_token(conn, "dave")
    view, _ = await services.deploys.request(
        NewDeploy(workspace="prod", action="apply", files={"main.tf": MAIN_TF}, max_attempts=1),
        owner="ann",
        actor="user:ann",
    )
    async with services.pool.connection() as conn:
        ws = await workspaces.find(conn, "ann", "prod")
    assert ws is not None
    await workspaces.set_member(services.pool, ws, "dave", "read", "user:ann")
    await services.deploys.execute(view.id, StartAttempt(worker="w"), "worker:w")  # it runs
    c = server.client
    assert (await c.get(f"/deploys/{view.id}", headers=bearer(dave))).status_code == 200
    got: list[str] = []
    ended = asyncio.Event()

    async def follow() -> None:
        async with c.stream("GET", stream_url(view.id), params={"access_token": dave}) as r:
            assert r.status_code == 200
            async for m in messages(r):
                got.append(m.event)
        ended.set()

    task = asyncio.create_task(follow())
    for _ in range(200):
        if got == ["Requested", "Started"]:
            break
        await asyncio.sleep(0.02)
    assert got == ["Requested", "Started"]
    await workspaces.remove_member(services.pool, ws, "dave", "user:ann")
    # At once for requests; within the recheck interval for the open stream.
    assert (await c.get(f"/deploys/{view.id}", headers=bearer(dave))).status_code == 404
    assert (await c.get(f"/deploys/{view.id}/logs", headers=bearer(dave))).status_code == 404
    await asyncio.wait_for(task, 5)
    assert ended.is_set() and "end" not in got  # cut off, not finished
    # The deploy goes on: its attempt succeeds, ann sees it to the end.
    persisted = PersistedState(
        workspace=ws.id, store="postgres", location="x", serial=1, lineage="l",
        sha256="0" * 64, size=2, state_version=1,
    )
    await services.deploys.execute(view.id, AttemptSucceeded(state=persisted), "worker:w")
    final = await collect(server, stream_url(view.id), user="ann", until=lambda m: m.event == "end")
    assert [m.event for m in final][-2:] == ["Succeeded", "end"]


# ---------------------------------------------------------------- tokens


async def test_expired_and_disabled_are_refused_from_the_next_request(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    async with services.pool.connection() as conn:
        soon = await create_user_token(conn, "ann", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    assert (await client.get("/deploys", headers=bearer(soon))).status_code == 200
    await asyncio.sleep(1.1)
    assert (await client.get("/deploys", headers=bearer(soon))).status_code == 401
    assert (await client.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 200
    async with services.pool.connection() as conn:
        assert await disable_user(conn, "ann")
    assert (await client.get("/deploys", headers=bearer(tokens["ann"]))).status_code == 401
    assert (await client.get("/deploys", headers=bearer(tokens["bob"]))).status_code == 200


async def test_last_used_is_written_by_the_lookup_at_most_once_a_minute(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    async def last_used() -> datetime | None:
        async with services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT t.last_used_at FROM api_tokens t JOIN users u ON u.id = t.user_id"
                " WHERE u.name = 'bob'"
            )
            row = await cur.fetchone()
        return row[0] if row else None

    assert await last_used() is None
    await client.get("/deploys", headers=bearer(tokens["bob"]))
    first = await last_used()
    assert first is not None
    for _ in range(3):
        await client.get("/deploys", headers=bearer(tokens["bob"]))
    assert await last_used() == first  # within the minute: not written again
    async with services.pool.connection() as conn:
        await conn.execute(
            "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds'"
            " WHERE user_id = (SELECT id FROM users WHERE name = 'bob')"
        )
    await client.get("/deploys", headers=bearer(tokens["bob"]))
    later = await last_used()
    assert later is not None and later > first


# ---------------------------------------------------------------- headers and documents


async def test_every_answer_carries_nosniff_and_frame_ancestors(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    root = bearer(tokens["root"])
    d = (await client.post("/deploys", headers=bearer(tokens["ann"]), json=body("web"))).json()
    answers = [
        await client.get("/health"),
        await client.get("/deploys", headers=root),
        await client.get(f"/deploys/{d['id']}/logs", headers=root),
        await client.get("/deploys"),  # 401
        await client.get("/no/such/path"),  # 404 from the router
        await client.post("/deploys", headers=root, content=b"{not json"),  # 400
        await client.get("/schema/openapi.json"),
        await client.get("/metrics", headers=root),
    ]
    for a in answers:
        assert a.headers["x-content-type-options"] == "nosniff", a.request.url
        assert "frame-ancestors 'none'" in a.headers["content-security-policy"], a.request.url
    # The status page keeps its stricter policy (one header, not two).
    page = await client.get("/")
    assert page.headers.get_list("content-security-policy") == [
        page.headers["content-security-policy"]
    ]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # State, versions, outputs, resources and logs are never kept by a cache.
    key = d["workspace_id"]
    await save_state(services, key, d["id"], b'{"version": 4, "serial": 1, "lineage": "l", "outputs": {}}')
    ann = bearer(tokens["ann"])
    for path in ("state", "states", "states/1", "outputs", "resources"):
        a = await client.get(f"/workspaces/web/{path}", headers=ann)
        assert a.status_code == 200 and a.headers["cache-control"] == "no-store", path
    logs = await client.get(f"/deploys/{d['id']}/logs", headers=ann)
    assert logs.headers["cache-control"] == "no-store"


async def test_schema_serves_no_third_party_script(client: httpx.AsyncClient) -> None:
    for path in ("/schema", "/schema/openapi.json", "/schema/openapi.yaml"):
        a = await client.get(path)
        assert a.status_code == 200, path
        assert "<script" not in a.text and "cdn" not in a.text.lower(), path
    assert (await client.get("/schema/scalar")).status_code == 404
    assert (await client.get("/schema/swagger")).status_code == 404


async def test_metrics_public_when_configured(database_url: str, tmp_path: Any) -> None:
    from service.services import open_services

    settings = from_env({}, data_dir=str(tmp_path), metrics_public=True)
    services = await open_services(settings, database_url, pool_size=2)
    try:
        transport = httpx.ASGITransport(app=create_app(services))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/metrics")
            assert response.status_code == 200 and "tfdeploy_database_up 1" in response.text
    finally:
        await services.close()


# ---------------------------------------------------------------- outputs and resources

STATE = {
    "version": 4,
    "terraform_version": "1.11.4",
    "serial": 4,
    "lineage": "l",
    "outputs": {
        "url": {"value": "https://web", "type": "string"},
        "ports": {"value": [80, 443], "type": ["list", "number"]},
        "password": {"value": "hunter2", "type": "string", "sensitive": True},
    },
    "resources": [
        {
            "mode": "managed",
            "type": "terraform_data",
            "name": "web",
            "provider": 'provider["terraform.io/builtin/terraform"]',
            "instances": [{"schema_version": 0, "attributes": {"input": "hunter2"}}],
        },
        {
            "module": "module.net",
            "mode": "managed",
            "type": "null_resource",
            "name": "n",
            "provider": 'provider["registry.terraform.io/hashicorp/null"].west',
            "instances": [
                {"index_key": 0, "attributes": {"id": "1"}},
                {"index_key": 1, "attributes": {"id": "2"}},
            ],
        },
        {
            "mode": "data",
            "type": "external",
            "name": "q",
            "provider": 'provider["registry.terraform.io/hashicorp/external"]',
            "instances": [{"index_key": "a b", "attributes": {"result": {"secret": "x"}}}],
        },
    ],
}


def test_outputs_and_resources_of_a_state_hold_no_secret() -> None:
    content = json.dumps(STATE).encode()
    # Values pass from the state to the answer as the state holds them (msgspec.Raw).
    as_json = {name: msgspec.json.decode(msgspec.json.encode(o)) for name, o in outputs_of(content).items()}
    outputs = {name: (o["value"], o["type"], o["sensitive"]) for name, o in as_json.items()}
    assert outputs == {
        "password": (None, "string", True),
        "ports": ([80, 443], ["list", "number"], False),
        "url": ("https://web", "string", False),
    }
    items = [
        (r.address, r.type, r.name, r.provider, r.mode, r.module) for r in resources_of(content)
    ]
    assert items == [
        ("terraform_data.web", "terraform_data", "web", "terraform.io/builtin/terraform", "managed", None),
        ("module.net.null_resource.n[0]", "null_resource", "n", "registry.terraform.io/hashicorp/null.west", "managed", "module.net"),
        ("module.net.null_resource.n[1]", "null_resource", "n", "registry.terraform.io/hashicorp/null.west", "managed", "module.net"),
        ('data.external.q["a b"]', "external", "q", "registry.terraform.io/hashicorp/external", "data", None),
    ]
    assert outputs_of(b'{"version": 4}') == {} and resources_of(b'{"version": 4}') == []


async def test_outputs_and_resources_over_the_api(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = bearer(tokens["ann"])
    d = (await client.post("/deploys", headers=ann, json=body("web"))).json()
    for path in ("outputs", "resources"):
        none = await client.get(f"/workspaces/web/{path}", headers=ann)
        assert none.status_code == 404 and none.json()["detail"] == "workspace has no persisted state"
    await save_state(services, d["workspace_id"], d["id"], json.dumps(STATE).encode())
    outputs = await client.get("/workspaces/web/outputs", headers=ann)
    assert outputs.json() == {
        "outputs": {
            "password": {"value": None, "type": "string", "sensitive": True},
            "ports": {"value": [80, 443], "type": ["list", "number"], "sensitive": False},
            "url": {"value": "https://web", "type": "string", "sensitive": False},
        }
    }
    resources = (await client.get("/workspaces/web/resources", headers=ann)).json()["items"]
    assert [r["address"] for r in resources][:2] == ["terraform_data.web", "module.net.null_resource.n[0]"]
    assert set(resources[0]) == {"address", "type", "name", "provider", "mode", "module"}
    for a in (outputs, await client.get("/workspaces/web/resources", headers=ann)):
        assert "hunter2" not in a.text and '"x"' not in a.text
    assert (await client.get("/workspaces/ann:web/outputs", headers=bearer(tokens["bob"]))).status_code == 404
    assert (await client.get("/workspaces/ann:web/outputs", headers=bearer(tokens["root"]))).status_code == 200


async def test_list_workspaces_pages_and_shows_the_latest(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = bearer(tokens["ann"])
    ids = {}
    for name in ("a", "b", "c", "d", "e"):
        ids[name] = (await client.post("/deploys", headers=ann, json=body(name))).json()
    second = (await client.post("/deploys", headers=ann, json=body("c"))).json()
    await save_state(services, ids["c"]["workspace_id"], ids["c"]["id"], b'{"version": 4, "serial": 9, "lineage": "l"}')
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        page = (await client.get("/workspaces", headers=ann, params=params)).json()
        seen += [w["ref"] for w in page["items"]]
        for w in page["items"]:
            if w["name"] == "c":
                assert w["latest_deploy"]["id"] == second["id"]
                assert (w["latest_state"]["version"], w["latest_state"]["serial"]) == (1, 9)
            elif w["name"] == "a":
                assert w["latest_state"] is None and w["role"] == "owner"
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == ["ann:a", "ann:b", "ann:c", "ann:d", "ann:e"]
    assert (await client.get("/workspaces", headers=bearer(tokens["bob"]))).json()["items"] == []
    admin = await client.get("/workspaces", headers=bearer(tokens["root"]), params={"owner": "ann"})
    assert [w["role"] for w in admin.json()["items"]] == ["admin"] * 5
    bad = await client.get("/workspaces", headers=ann, params={"after": "garbage"})
    assert bad.status_code == 400


@pytest.mark.parametrize("stream_options", [StreamOptions(ping=15.0, send_timeout=5.0, auth_recheck=0.2)])
async def test_a_disabled_users_open_streams_end(server: Server, services: Services) -> None:  # noqa: F811
    """Disabling a user refuses their tokens everywhere, open event streams included (the shared
    token checks of service/api/streams.py)."""
    async with services.pool.connection() as conn:
        eve = await create_token(conn, "eve", admin=True)
    view, _ = await services.deploys.request(
        NewDeploy(workspace="w", action="apply", files={"main.tf": MAIN_TF}, max_attempts=1),
        owner="eve",
        actor="admin:eve",
    )
    ended: list[str] = []

    async def follow(path: str) -> None:
        async with server.client.stream("GET", path, params={"access_token": eve}) as r:
            assert r.status_code == 200
            async for _ in messages(r):
                pass
        ended.append(path)

    paths = (stream_url(view.id), "/events/stream")
    tasks = [asyncio.create_task(follow(p)) for p in paths]
    for _ in range(250):
        if server.hub.subscriber_count == 2:
            break
        await asyncio.sleep(0.02)
    assert server.hub.subscriber_count == 2
    async with services.pool.connection() as conn:
        assert await disable_user(conn, "eve")
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(ended) == sorted(paths)
    refused = await server.client.get("/events/stream", params={"access_token": eve})
    assert refused.status_code == 401
