"""The HTTP API end to end, against a real database (no worker: deploys stay queued unless a test
drives them with lifecycle commands)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.lifecycle import AttemptFailed, StartAttempt
from service.logs import append_lines, append_log, read_logs
from service.services import Services, open_services
from service.settings import from_env

MAIN_TF = 'resource "null_resource" "x" {}\n'
BODY = {"files": {"main.tf": MAIN_TF}}
COUNTED_TABLES = (
    "events",
    "deploys",
    "deploy_inputs",
    "deploy_secrets",
    "idempotency_keys",
    "procrastinate_jobs",
)


class Api:
    """An httpx client on the app (same event loop as the pool) plus a token per user."""

    def __init__(self, client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
        self.client = client
        self.tokens = tokens

    def auth(self, user: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}

    async def request(
        self, method: str, url: str, user: str | None = "ann", **kw: Any
    ) -> httpx.Response:
        headers = {**self.auth(user), **kw.pop("headers", {})}
        return await self.client.request(method, url, headers=headers, **kw)

    async def get(self, url: str, user: str | None = "ann", **kw: Any) -> httpx.Response:
        return await self.request("GET", url, user, **kw)

    async def post(self, url: str, user: str | None = "ann", **kw: Any) -> httpx.Response:
        return await self.request("POST", url, user, **kw)

    async def deploy(self, user: str = "ann", **body: Any) -> dict[str, Any]:
        response = await self.post("/deploys", user, json={**BODY, **body})
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture
async def api(services: Services, tokens: dict[str, str]) -> AsyncIterator[Api]:
    app = create_app(services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tfdeploy.test") as client:
        yield Api(client, tokens)


async def counts(services: Services) -> dict[str, int]:
    out = {}
    async with services.pool.connection() as conn:
        for table in COUNTED_TABLES:
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            out[table] = (await cur.fetchone())[0]
    return out


async def fail(services: Services, deploy_id: str) -> None:
    """Drive a deploy with max_attempts=1 to ``failed``."""
    await services.deploys.execute(deploy_id, StartAttempt(worker="w"), "worker:w")
    await services.deploys.execute(
        deploy_id, AttemptFailed(reason="apply_failed", message="boom"), "worker:w"
    )


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status_code"] == status and isinstance(body["detail"], str)
    assert "Traceback" not in response.text
    return body


# ---------------------------------------------------------------- POST /deploys


async def test_request_deploy_202_shape_and_location(api: Api, services: Services) -> None:
    response = await api.post(
        "/deploys",
        json={
            "workspace": "web",
            "files": {"main.tf": MAIN_TF},
            "variables": {"region": "kr"},
            "secrets": {"token": "hunter2-secret"},
        },
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/deploys/{body['id']}"
    assert "idempotent-replayed" not in response.headers
    contract = {
        "id",
        "workspace",
        "action",
        "status",
        "attempt",
        "max_attempts",
        "created_at",
        "updated_at",
    }
    assert contract <= set(body)
    assert "error" not in body
    assert body["workspace"] == "web" and body["action"] == "apply" and body["status"] == "queued"
    assert body["attempt"] == 1 and body["max_attempts"] == 3
    assert body["owner"] == "ann" and body["version"] == 1 and body["cancel_requested"] is False
    assert body["state_version"] is None
    assert "hunter2-secret" not in response.text
    # Recorded, with its job.
    assert (await counts(services))["procrastinate_jobs"] == 1
    got = await api.get(f"/deploys/{body['id']}")
    assert got.status_code == 200 and got.json() == body


async def test_request_defaults_and_explicit_max_attempts(api: Api) -> None:
    body = await api.deploy(max_attempts=5, action="destroy")
    assert (
        body["max_attempts"] == 5 and body["action"] == "destroy" and body["workspace"] == "default"
    )


async def test_idempotency_same_key_same_body(api: Api, services: Services) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = await api.post("/deploys", json=BODY, headers=headers)
    second = await api.post("/deploys", json=BODY, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM events WHERE type = 'Requested'")
        assert (await cur.fetchone())[0] == 1
    assert (await counts(services))["procrastinate_jobs"] == 1
    # Another user's identical key is theirs alone.
    bobs = await api.post("/deploys", "bob", json=BODY, headers=headers)
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]


async def test_idempotency_same_key_other_body_is_422(api: Api, services: Services) -> None:
    headers = {"Idempotency-Key": "k"}
    assert (await api.post("/deploys", json=BODY, headers=headers)).status_code == 202
    before = await counts(services)
    other = await api.post("/deploys", json={**BODY, "workspace": "elsewhere"}, headers=headers)
    assert_error(other, 422)
    assert await counts(services) == before


async def test_idempotency_key_too_long_is_422(api: Api, services: Services) -> None:
    before = await counts(services)
    assert_error(await api.post("/deploys", json=BODY, headers={"Idempotency-Key": "x" * 201}), 422)
    assert await counts(services) == before
    assert (
        await api.post("/deploys", json=BODY, headers={"Idempotency-Key": "x" * 200})
    ).status_code == 202


BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed json", b'{"files": {"main.tf": ', 400),
    ("not an object", b"[1, 2]", 422),
    ("unknown field", b'{"files": {"main.tf": "x = 1"}, "bogus": 1}', 422),
    ("no files", b'{"workspace": "w"}', 422),
    ("bad file name", b'{"files": {"../main.tf": "# x"}}', 422),
    ("hidden file", b'{"files": {".main.tf": "# x"}}', 422),
    ("state file", b'{"files": {"terraform.tfstate.json": "{}"}}', 422),
    ("invalid json file", b'{"files": {"main.tf.json": "{nope"}}', 422),
    ("not utf-8", b'{"files": {"main.tf": "\xff"}}', 400),
    ("wrong extension", b'{"files": {"main.sh": "echo hi"}}', 422),
    ("backend block", b'{"files": {"main.tf": "terraform {\\n  backend \\"s3\\" {}\\n}\\n"}}', 422),
    ("cloud block", b'{"files": {"main.tf": "terraform {\\n  cloud {}\\n}\\n"}}', 422),
    ("invalid hcl", b'{"files": {"main.tf": "resource \\"x\\" {"}}', 422),
    ("bad action", b'{"files": {"main.tf": "# x"}, "action": "explode"}', 422),
    ("bad workspace", b'{"files": {"main.tf": "# x"}, "workspace": "../etc"}', 422),
    ("non-string variable", b'{"files": {"main.tf": "# x"}, "variables": {"a": 1}}', 422),
    ("zero attempts", b'{"files": {"main.tf": "# x"}, "max_attempts": 0}', 422),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_requests_are_refused_and_write_nothing(
    api: Api, services: Services, name: str, body: bytes, status: int
) -> None:
    before = await counts(services)
    response = await api.post(
        "/deploys",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": "bad-" + name.replace(" ", "-"),
        },
    )
    assert_error(response, status)
    assert await counts(services) == before


async def test_too_large_by_content_length(api: Api, services: Services) -> None:
    before = await counts(services)
    big = {"files": {"main.tf": "# " + "x" * (70 * 1024)}}
    assert_error(await api.post("/deploys", json=big), 413)
    assert await counts(services) == before


async def test_too_large_while_streaming_without_content_length(
    api: Api, services: Services
) -> None:
    before = await counts(services)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"files": {"main.tf": "# '
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}}'

    response = await api.post(
        "/deploys", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413)
    assert await counts(services) == before


# ---------------------------------------------------------------- auth


async def test_401_without_token_bad_token_and_bad_scheme(api: Api, services: Services) -> None:
    before = await counts(services)
    for response in (
        await api.get("/deploys", None),
        await api.get("/deploys", None, headers={"Authorization": "Bearer tfd_nope"}),
        await api.get("/deploys", None, headers={"Authorization": f"Basic {api.tokens['ann']}"}),
        await api.post("/deploys", None, json=BODY),
        await api.get("/events", None),
        await api.get("/workspaces/default/states", None),
    ):
        assert_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert await counts(services) == before


async def test_access_token_query_parameter_only_on_the_stream_routes(api: Api) -> None:
    mine = await api.deploy()
    # A token in the URL lands in access logs and browser history: only EventSource needs one.
    response = await api.get(
        f"/deploys/{mine['id']}", None, params={"access_token": api.tokens["ann"]}
    )
    assert_error(response, 401)
    assert_error(await api.get("/deploys", None, params={"access_token": "garbage"}), 401)
    # (The stream routes take it: tests/test_streams.py, tests/test_roles.py.)


async def test_revoked_token_is_401(api: Api, services: Services) -> None:
    from service.auth import list_tokens, revoke_token

    async with services.pool.connection() as conn:
        bobs = [t["id"] for t in await list_tokens(conn) if t["user"] == "bob"]
        assert len(bobs) == 1 and await revoke_token(conn, bobs[0])
    assert_error(await api.get("/deploys", "bob"), 401)


# ---------------------------------------------------------------- reading deploys


async def test_other_users_unknown_and_malformed_ids_are_404(api: Api, services: Services) -> None:
    anns = await api.deploy()
    unknown = "00000000-0000-4000-8000-000000000000"
    before = await counts(services)
    for did, user in (
        (anns["id"], "bob"),
        (unknown, "ann"),
        ("not-a-uuid", "ann"),
        (unknown, "root"),
    ):
        for method, suffix in (
            ("GET", ""),
            ("GET", "/events"),
            ("GET", "/logs"),
            ("POST", "/cancel"),
            ("POST", "/replay"),
        ):
            response = await api.request(method, f"/deploys/{did}{suffix}", user)
            assert_error(response, 404)
    assert await counts(services) == before
    # The owner and an admin do see it.
    assert (await api.get(f"/deploys/{anns['id']}", "ann")).status_code == 200
    assert (await api.get(f"/deploys/{anns['id']}", "root")).status_code == 200


async def test_list_pagination_visits_every_deploy_once(api: Api) -> None:
    created = {(await api.deploy(workspace=f"ws{i % 2}"))["id"] for i in range(7)}
    await api.deploy("bob")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        response = await api.get("/deploys", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert len(page["items"]) <= 3
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7 and set(seen) == created
    # Newest first.
    listing = (await api.get("/deploys")).json()["items"]
    stamps = [item["created_at"] for item in listing]
    assert stamps == sorted(stamps, reverse=True)


async def test_list_filters_and_visibility(api: Api, services: Services) -> None:
    a1 = await api.deploy(workspace="alpha")
    a2 = await api.deploy(workspace="beta", max_attempts=1)
    b1 = await api.deploy("bob", workspace="alpha")
    await fail(services, a2["id"])

    def ids(response: httpx.Response) -> set[str]:
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    assert ids(await api.get("/deploys")) == {a1["id"], a2["id"]}
    assert ids(await api.get("/deploys", "bob")) == {b1["id"]}
    assert ids(await api.get("/deploys", "root")) == {a1["id"], a2["id"], b1["id"]}
    # Workspace names are per user: ann's alpha is not bob's.
    assert ids(await api.get("/deploys", params={"workspace": "alpha"})) == {a1["id"]}
    assert ids(await api.get("/deploys", "bob", params={"workspace": "alpha"})) == {b1["id"]}
    assert ids(await api.get("/deploys", "root", params={"workspace": "ann:alpha"})) == {a1["id"]}
    assert ids(await api.get("/deploys", "root", params={"workspace": "bob:alpha"})) == {b1["id"]}
    assert_error(await api.get("/deploys", "root", params={"workspace": "alpha"}), 404)
    assert_error(await api.get("/deploys", "bob", params={"workspace": "ann:alpha"}), 404)
    assert a1["workspace"] == b1["workspace"] == "alpha"
    assert (a1["workspace_owner"], b1["workspace_owner"]) == ("ann", "bob")
    assert a1["workspace_id"] != b1["workspace_id"]
    assert ids(await api.get("/deploys", params={"status": "failed"})) == {a2["id"]}
    assert ids(await api.get("/deploys", params={"status": "queued"})) == {a1["id"]}
    assert ids(await api.get("/deploys", params={"status": "succeeded"})) == set()
    assert ids(await api.get("/deploys", "root", params={"owner": "bob"})) == {b1["id"]}
    assert ids(await api.get("/deploys", "bob", params={"owner": "ann"})) == set()
    failed = (await api.get(f"/deploys/{a2['id']}")).json()
    assert failed["status"] == "failed"
    assert failed["error"] == {"reason": "apply_failed", "message": "boom"}


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"status": "bogus"}, 422),
        ({"limit": 0}, 422),
        ({"limit": 201}, 422),
        ({"limit": "many"}, 400),
        ({"cursor": "garbage!!"}, 400),
        ({"cursor": base64.urlsafe_b64encode(b"2024-01-01|nope").decode()}, 400),
    ],
)
async def test_list_bad_query_parameters(api: Api, params: dict[str, Any], status: int) -> None:
    assert_error(await api.get("/deploys", params=params), status)


async def test_deploy_events(api: Api, services: Services) -> None:
    mine = await api.deploy(max_attempts=2)
    await services.deploys.execute(mine["id"], StartAttempt(worker="w"), "worker:w")
    response = await api.get(f"/deploys/{mine['id']}/events")
    assert response.status_code == 200
    items = response.json()["items"]
    assert [e["type"] for e in items] == ["Requested", "Started"]
    assert [e["version"] for e in items] == [1, 2]
    first = items[0]
    assert set(first) == {
        "position",
        "deploy_id",
        "version",
        "type",
        "data",
        "recorded_at",
        "actor",
        "stream",
        "workspace_id",
    }
    assert first["deploy_id"] == mine["id"] and first["actor"] == "user:ann"
    assert first["stream"] == "deploy" and first["workspace_id"] == mine["workspace_id"]
    assert first["data"]["workspace"] == "default"
    later = await api.get(f"/deploys/{mine['id']}/events", params={"after": 1})
    assert [e["type"] for e in later.json()["items"]] == ["Started"]
    assert (await api.get(f"/deploys/{mine['id']}")).json()["status"] == "deploying"


async def test_deploy_logs(api: Api, services: Services) -> None:
    mine = await api.deploy()
    empty = await api.get(f"/deploys/{mine['id']}/logs")
    assert empty.status_code == 200 and empty.text == ""
    assert empty.headers["content-type"].startswith("text/plain")
    async with services.pool.connection() as conn:
        assert await append_log(conn, mine["id"], 1, "stdout", "Initializing...") == 1
        assert (
            await append_lines(conn, mine["id"], 1, "stdout", ["Plan: 1 to add", "Apply complete!"])
            == 3
        )
    response = await api.get(f"/deploys/{mine['id']}/logs")
    assert response.text == "Initializing...\nPlan: 1 to add\nApply complete!"
    assert response.headers["x-last-seq"] == "3"
    tail = await api.get(f"/deploys/{mine['id']}/logs", params={"after_seq": 2})
    assert tail.text == "Apply complete!"


async def test_log_seq_is_gap_free_under_concurrent_writers(services: Services) -> None:
    import asyncio
    import uuid

    deploy_id = str(uuid.uuid4())

    async def writer(n: int) -> None:
        for i in range(10):
            async with services.pool.connection() as conn:
                await append_lines(conn, deploy_id, 1, "stdout", [f"{n}-{i}-a", f"{n}-{i}-b"])

    await asyncio.gather(*(writer(n) for n in range(4)))
    async with services.pool.connection() as conn:
        lines = await read_logs(conn, deploy_id)
    assert [line.seq for line in lines] == list(range(1, 81))
    # A batch stays contiguous.
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        assert first.line.endswith("-a") and second.line == first.line[:-1] + "b"


# ---------------------------------------------------------------- cancel and replay


async def test_cancel_queued_then_again_is_409(api: Api, services: Services) -> None:
    mine = await api.deploy(secrets={"k": "secret-value"})
    response = await api.post(f"/deploys/{mine['id']}/cancel")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "cancelled" and body["error"]["reason"] == "cancelled"
    assert (await counts(services))["deploy_secrets"] == 0
    again = assert_error(await api.post(f"/deploys/{mine['id']}/cancel"), 409)
    assert "cancelled" in again["detail"]


async def test_admin_may_cancel_anyones_deploy(api: Api) -> None:
    mine = await api.deploy()
    response = await api.post(f"/deploys/{mine['id']}/cancel", "root")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


async def test_replay(api: Api, services: Services) -> None:
    mine = await api.deploy(max_attempts=1)
    assert_error(await api.post(f"/deploys/{mine['id']}/replay", "root"), 409)  # queued
    await fail(services, mine["id"])
    before = await counts(services)
    assert_error(await api.post(f"/deploys/{mine['id']}/replay", "ann"), 403)  # not an admin
    assert await counts(services) == before
    response = await api.post(f"/deploys/{mine['id']}/replay", "root")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "retrying" and body["attempt"] == 2 and body["max_attempts"] == 1 + 3
    events = (await api.get(f"/deploys/{mine['id']}/events")).json()["items"]
    assert events[-1]["type"] == "Retried" and events[-1]["data"]["by"] == "admin"
    assert events[-1]["actor"] == "admin:root"
    assert (await counts(services))["procrastinate_jobs"] == before["procrastinate_jobs"] + 1
    assert_error(await api.post(f"/deploys/{mine['id']}/replay", "root"), 409)  # retrying now


# ---------------------------------------------------------------- events


async def test_events_audit_query(api: Api, services: Services) -> None:
    a = await api.deploy(workspace="alpha", max_attempts=1)
    b = await api.deploy("bob", workspace="beta")
    await fail(services, a["id"])

    def types(response: httpx.Response) -> list[tuple[str, str]]:
        assert response.status_code == 200, response.text
        return [(e["deploy_id"], e["type"]) for e in response.json()["items"]]

    # Each first deploy to a name claimed a workspace: WorkspaceCreated in the workspace's own
    # stream (deploy_id null), visible to its owner and admins.
    anns = [(None, "WorkspaceCreated"), (a["id"], "Requested"), (a["id"], "Started"), (a["id"], "Failed")]
    bobs = [(None, "WorkspaceCreated"), (b["id"], "Requested")]
    assert types(await api.get("/events")) == anns
    assert types(await api.get("/events", "bob")) == bobs
    everything = types(await api.get("/events", "root"))
    assert len(everything) == 6
    assert types(await api.get("/events", "root", params={"workspace": "bob:beta"})) == bobs
    assert types(await api.get("/events", "bob", params={"workspace": "beta"})) == bobs
    assert_error(await api.get("/events", "root", params={"workspace": "beta"}), 404)
    assert_error(await api.get("/events", params={"workspace": "bob:beta"}), 404)
    assert types(await api.get("/events", "root", params={"type": "Requested"})) == [
        (a["id"], "Requested"),
        (b["id"], "Requested"),
    ]
    assert types(await api.get("/events", "root", params={"actor": "worker:w"})) == anns[2:]
    assert types(await api.get("/events", "root", params={"deploy_id": b["id"]})) == [
        (b["id"], "Requested")
    ]
    # bob asks for ann's deploy: nothing.
    assert types(await api.get("/events", "bob", params={"deploy_id": a["id"]})) == []
    # Time window.
    assert types(await api.get("/events", params={"since": "2000-01-01T00:00:00Z"})) == anns
    assert types(await api.get("/events", params={"until": "2000-01-01T00:00:00+00:00"})) == []
    assert types(await api.get("/events", params={"since": "2999-01-01T00:00:00"})) == []
    # Unencoded "+" arriving as a space still parses.
    raw = await api.get("/events?until=2999-01-01T00:00:00+01:00")
    assert types(raw) == anns
    workspace_event = (await api.get("/events", params={"type": "WorkspaceCreated"})).json()["items"]
    assert [(e["stream"], e["deploy_id"], e["workspace_id"]) for e in workspace_event] == [
        ("workspace", None, a["workspace_id"])
    ]
    assert workspace_event[0]["data"] == {
        "name": "alpha", "owner": "ann", "deploy_id": a["id"], "migrated": False
    }


async def test_events_pagination(api: Api) -> None:
    for _ in range(5):
        await api.deploy()
    seen: list[int] = []
    after = 0
    while True:
        page = (await api.get("/events", params={"after": after, "limit": 2})).json()
        seen.extend(e["position"] for e in page["items"])
        if page["next"] is None:
            break
        after = page["next"]
    assert len(seen) == 6 and seen == sorted(seen)  # 5 Requested and the WorkspaceCreated


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"limit": 0}, 422),
        ({"limit": 1001}, 422),
        ({"since": "yesterday"}, 400),
        ({"deploy_id": "nope"}, 400),
        ({"after": "x"}, 400),
    ],
)
async def test_events_bad_query_parameters(api: Api, params: dict[str, Any], status: int) -> None:
    assert_error(await api.get("/events", params=params), status)


# ---------------------------------------------------------------- workspaces


async def test_workspace_state(api: Api, services: Services) -> None:
    from service.statestores import index, make_state_store
    from service.statestores.base import StoredState

    mine = await api.deploy(workspace="web")
    key = mine["workspace_id"]  # states are keyed by the workspace's id
    assert_error(await api.get("/workspaces/web/state"), 404)  # no state yet
    listing = await api.get("/workspaces/web/states")
    assert listing.status_code == 200 and listing.json() == {"items": [], "next": None}
    content = b'{"version": 4, "serial": 7, "lineage": "abc", "resources": []}'
    serial, lineage, sha, size = index.state_meta(content)
    state_store = make_state_store(services.settings, services.pool)
    for _ in range(2):
        async with services.pool.connection() as conn, conn.transaction():
            version = await index.next_version(conn, key)
            stored: StoredState = await state_store.put(key, version, content, sha)
            await index.record_version(
                conn, key, version, mine["id"], 1, stored, serial, lineage, sha, size
            )
    response = await api.get("/workspaces/web/state")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    assert response.content == content and response.headers["x-state-version"] == "2"
    page = (await api.get("/workspaces/web/states", params={"limit": 1})).json()
    assert [v["version"] for v in page["items"]] == [2] and page["next"] == 2
    page = (await api.get("/workspaces/web/states", params={"limit": 1, "before": 2})).json()
    assert [v["version"] for v in page["items"]] == [1] and page["next"] is None
    assert "location" not in page["items"][0]
    assert page["items"][0]["workspace"] == "web" and page["items"][0]["workspace_owner"] == "ann"
    one = await api.get("/workspaces/web/states/1")
    assert one.status_code == 200 and one.content == content
    assert one.headers["cache-control"] == "no-store"
    assert_error(await api.get("/workspaces/web/states/9"), 404)
    # "web" names bob's own web, which does not exist; ann's is not his to see. The admin sees
    # ann's as ann:web (and so does ann).
    assert_error(await api.get("/workspaces/web/state", "bob"), 404)
    assert_error(await api.get("/workspaces/ann:web/state", "bob"), 404)
    assert_error(await api.get("/workspaces/ann:web/states", "bob"), 404)
    assert (await api.get("/workspaces/ann:web/state", "root")).status_code == 200
    assert (await api.get("/workspaces/ann:web/state")).status_code == 200
    assert_error(await api.get("/workspaces/web/state", "root"), 404)
    assert_error(await api.get("/workspaces/nowhere/state", "root"), 404)
    # Every read of a tfstate is in the workspace's stream, for its owner and admins.
    downloads = (
        await api.get("/events", params={"workspace": "web", "type": "StateDownloaded"})
    ).json()["items"]
    assert [(e["actor"], e["data"]["state_version"], e["data"]["latest"]) for e in downloads] == [
        ("user:ann", 2, True),
        ("user:ann", 1, False),
        ("admin:root", 2, True),
        ("user:ann", 2, True),
    ]


# ---------------------------------------------------------------- operations


async def test_health(api: Api) -> None:
    response = await api.get("/health", None)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"


async def test_health_503_when_database_unreachable(
    tmp_path: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api import health

    monkeypatch.setattr(health, "HEALTH_TIMEOUT", 0.5)
    settings = from_env({}, data_dir=str(tmp_path), metrics_public=True)
    services = await open_services(settings, database_url, pool_size=2)
    try:
        app = create_app(services)
        unreachable = await _pool_to_nowhere()
        real, services.pool = services.pool, unreachable
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as c:
                response = await c.get("/health")
                assert response.status_code == 503
                assert response.json()["database"] == "unreachable"
                metrics = await c.get("/metrics")
                assert metrics.status_code == 200 and "tfdeploy_database_up 0" in metrics.text
                down = await c.get("/deploys", headers={"Authorization": "Bearer tfd_x"})
                assert_error(down, 503)
        finally:
            services.pool = real
            await unreachable.close()
    finally:
        await services.close()


async def _pool_to_nowhere() -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1",
        min_size=1,
        max_size=1,
        open=False,
        timeout=0.5,
    )
    await pool.open(wait=False)
    return pool


async def test_metrics(api: Api, services: Services) -> None:
    await api.deploy()
    failed = await api.deploy(max_attempts=1)
    await fail(services, failed["id"])
    # An admin's: the figures tell who runs how much (TFDEPLOY_METRICS_PUBLIC=true opens it).
    assert_error(await api.get("/metrics", None), 401)
    assert_error(await api.get("/metrics", "ann"), 403)
    response = await api.get("/metrics", "root")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE tfdeploy_deploys gauge" in text
    assert 'tfdeploy_deploys{status="queued"} 1' in text
    assert 'tfdeploy_deploys{status="failed"} 1' in text
    assert 'tfdeploy_deploys{status="succeeded"} 0' in text
    assert "tfdeploy_events_total 5" in text  # and the WorkspaceCreated of "default"
    assert "tfdeploy_database_up 1" in text


async def test_openapi_schema(api: Api) -> None:
    response = await api.get("/schema/openapi.json", None)
    assert response.status_code == 200
    doc = response.json()
    paths = doc["paths"]
    for path in (
        "/deploys",
        "/deploys/{deploy_id}",
        "/deploys/{deploy_id}/events",
        "/deploys/{deploy_id}/logs",
        "/deploys/{deploy_id}/cancel",
        "/deploys/{deploy_id}/replay",
        "/workspaces/{name}/state",
        "/workspaces/{name}/states",
        "/events",
        "/health",
        "/metrics",
    ):
        assert path in paths, path
    schemes = doc["components"]["securitySchemes"]
    assert schemes["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        **{k: v for k, v in schemes["BearerToken"].items() if k not in ("type", "scheme")},
    }
    post = paths["/deploys"]["post"]
    assert {"BearerToken": []} in post["security"]
    assert "files" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "security" not in paths["/health"]["get"]
    assert (await api.get("/schema", None)).status_code == 200


async def test_unknown_route_and_method_are_json_errors(api: Api) -> None:
    assert_error(await api.get("/nope"), 404)
    response = await api.request("DELETE", "/deploys")
    assert_error(response, 405)
