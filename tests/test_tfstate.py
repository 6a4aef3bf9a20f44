"""Terraform's http state backend on tfdeploy (issue #15): the rules alone
(service.cli_backend_rules' pure decisions), then the routes against a real PostgreSQL -- auth,
Content-MD5, the one lock shared with the deploy queue (what LOCK sees of deploys, what the claim
sees of LOCK), safe writes, the audit trail, ``tfdeploy workspace unlock``. The real
``terraform`` binary as the client is tests/test_tfstate_cli.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_dispatch_claim import Queue, notifications

from service import workspaces
from service.cli_backend_rules import (
    Accept,
    BadLockInfo,
    CliLock,
    DeployHolder,
    ForceUnlockDenied,
    Granted,
    LockConflict,
    Locked,
    NothingHeld,
    Release,
    Repeated,
    StateMeta,
    StateRefused,
    Unchanged,
    decide_lock,
    decide_unlock,
    decide_write,
    parse_lock_info,
)
from service.events import PlanSummary
from service.lifecycle import Discard, PlanMade, StartAttempt
from service.services import Services

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 5, 8, 50, 23, tzinfo=UTC)


# ---------------------------------------------------------------- helpers


def basic(token: str, user: str = "terraform") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def md5(body: bytes) -> dict[str, str]:
    return {"Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()}


def tfstate(serial: int, lineage: str = "lineage-1", name: str = "web") -> bytes:
    return json.dumps(
        {
            "version": 4,
            "terraform_version": "1.11.4",
            "serial": serial,
            "lineage": lineage,
            "outputs": {},
            "resources": [
                {
                    "mode": "managed",
                    "type": "terraform_data",
                    "name": name,
                    "provider": 'provider["terraform.io/builtin/terraform"]',
                    "instances": [{"schema_version": 0, "attributes": {"id": "x"}}],
                }
            ],
        }
    ).encode()


def info(lock_id: str, **extra: str) -> bytes:
    return json.dumps(
        {
            "ID": lock_id,
            "Operation": "OperationTypeApply",
            "Info": "",
            "Who": "ann@laptop",
            "Version": "1.11.4",
            "Created": "2026-12-05T08:50:23.848353578Z",
            "Path": "",
            **extra,
        }
    ).encode()


class Cli:
    """What terraform's http client sends, for one user's token."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client, self.token = client, token

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = basic(self.token)
        if body is not None:
            headers |= md5(body) | {"Content-Type": "application/json"}
        return headers

    async def get(self, ref: str) -> httpx.Response:
        return await self.client.get(f"/workspaces/{ref}/tfstate", headers=self._headers(None))

    async def put(self, ref: str, body: bytes, lock_id: str = "") -> httpx.Response:
        params = {"ID": lock_id} if lock_id else {}
        return await self.client.post(
            f"/workspaces/{ref}/tfstate", content=body, params=params, headers=self._headers(body)
        )

    async def lock(self, ref: str, lock_id: str, method: str = "LOCK") -> httpx.Response:
        body = info(lock_id)
        return await self.client.request(
            method, f"/workspaces/{ref}/tfstate/lock", content=body, headers=self._headers(body)
        )

    async def unlock(self, ref: str, lock_id: str | None, method: str = "UNLOCK") -> httpx.Response:
        body = info(lock_id) if lock_id is not None else b""
        return await self.client.request(
            method, f"/workspaces/{ref}/tfstate/lock", content=body, headers=self._headers(body)
        )


async def events_of(services: Services, workspace_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(type, actor, data) of a workspace's own stream."""
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT type, actor, data FROM events WHERE deploy_id = %s AND stream_kind = 'workspace'"
            " ORDER BY version",
            (workspace_id,),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def find(services: Services, owner: str, name: str) -> workspaces.Workspace:
    async with services.pool.connection() as conn:
        ws = await workspaces.find(conn, owner, name)
    assert ws is not None
    return ws


async def lock_rows(services: Services) -> list[tuple[str, str, str]]:
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT workspace_id::text, lock_id, holder FROM workspace_locks")
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


# ---------------------------------------------------------------- the rules alone


def test_lock_info_is_terraforms_and_an_empty_body_is_a_force_unlock() -> None:
    parsed = parse_lock_info(info("abc"))
    assert parsed is not None and parsed.ID == "abc" and parsed.Who == "ann@laptop"
    assert parsed.Created == "2026-12-05T08:50:23.848353578Z"
    assert parse_lock_info(b"") is None and parse_lock_info(b"  \n") is None
    # No Created: one Go can read back is filled in (terraform parses the holder's info).
    assert parse_lock_info(b'{"ID": "x"}', NOW).Created == "2026-12-05T08:50:23Z"  # type: ignore[union-attr]
    for bad in (
        b"[]",
        b"not json",
        b'{"ID": ""}',
        b'{"ID": "  "}',
        b'{"Who": "x"}',
        b'{"ID": 3}',
        b'{"ID": "x", "Created": "yesterday"}',
        b'{"ID": "x", "Info": "a\\u0000b"}',
        json.dumps({"ID": "x" * 257}).encode(),
        b'{"ID": "a\\nb"}',
    ):
        with pytest.raises(BadLockInfo):
            parse_lock_info(bad)


def _cli(lock_id: str = "L1", holder: str = "ann") -> CliLock:
    return CliLock(lock_id=lock_id, info={"ID": lock_id, "Who": "ann@laptop"}, holder=holder, created_at=NOW)


def _deploy(status: str = "deploying") -> DeployHolder:
    return DeployHolder(id="d-1", owner="ann", action="apply", status=status, created_at=NOW)


def test_decide_lock() -> None:
    assert decide_lock(None, None, "L1", "ann", "ann:prod") == Granted()
    assert decide_lock(_cli(), None, "L1", "ann", "ann:prod") == Repeated()
    with pytest.raises(Locked) as held:
        decide_lock(_cli(), None, "L2", "ann", "ann:prod")
    assert held.value.lock_info is not None and held.value.lock_info["ID"] == "L1"
    # The holder's ID from another user is not theirs.
    with pytest.raises(Locked):
        decide_lock(_cli(), None, "L1", "dave", "ann:prod")
    for status in ("deploying", "queued", "planned"):
        with pytest.raises(Locked) as by_deploy:
            decide_lock(None, _deploy(status), "L1", "ann", "ann:prod")
        lock_info = by_deploy.value.lock_info
        assert lock_info is not None
        assert lock_info["ID"] == "deploy:d-1" and lock_info["Path"] == "ann:prod"
        assert lock_info["Created"] == "2026-12-05T08:50:23Z" and "ann" in lock_info["Who"]
        assert ("approval" in lock_info["Info"]) == (status == "planned")


def test_decide_unlock() -> None:
    ref = "ann:prod"
    assert decide_unlock(_cli(), None, "L1", "ann", False, ref) == Release(_cli())
    assert decide_unlock(None, None, "L1", "ann", False, ref) == NothingHeld()
    assert decide_unlock(None, _deploy(), "L1", "ann", False, ref) == NothingHeld()
    with pytest.raises(LockConflict) as other:
        decide_unlock(_cli(), None, "L2", "ann", False, ref)
    assert other.value.lock_info is not None and other.value.lock_info["ID"] == "L1"
    with pytest.raises(LockConflict):
        decide_unlock(_cli(), None, "L1", "dave", False, ref)
    with pytest.raises(LockConflict, match="cancel"):
        decide_unlock(None, _deploy(), "deploy:d-1", "ann", True, ref)
    # Force-unlock: admins only, of a CLI's lock, never of a deploy's hold.
    with pytest.raises(ForceUnlockDenied):
        decide_unlock(_cli(), None, None, "ann", False, ref)
    assert decide_unlock(_cli(), None, None, "root", True, ref) == Release(_cli(), force=True)
    assert decide_unlock(None, None, None, "root", True, ref) == NothingHeld()
    with pytest.raises(LockConflict, match="cancel"):
        decide_unlock(None, _deploy(), None, "root", True, ref)


def test_decide_write() -> None:
    ref = "ann:prod"
    latest = StateMeta(5, "L", "sha-5")
    assert decide_write(None, None, "", "ann", None, StateMeta(1, "X", "a"), ref) == Accept()
    assert decide_write(None, None, "", "ann", latest, StateMeta(6, "L", "b"), ref) == Accept()
    assert decide_write(None, None, "", "ann", latest, StateMeta(5, "L", "sha-5"), ref) == Unchanged()
    assert decide_write(_cli(), None, "L1", "ann", latest, StateMeta(9, "L", "c"), ref) == Accept()
    for new in (StateMeta(6, "M", "b"), StateMeta(4, "L", "b"), StateMeta(5, "L", "other")):
        with pytest.raises(StateRefused):
            decide_write(None, None, "", "ann", latest, new, ref)
    for lock_id, user in (("", "ann"), ("L2", "ann"), ("L1", "dave")):
        with pytest.raises(Locked):
            decide_write(_cli(), None, lock_id, user, latest, StateMeta(6, "L", "b"), ref)
    with pytest.raises(Locked):  # a deploy holds it: nobody writes, whatever the lock says
        decide_write(_cli(), _deploy(), "L1", "ann", latest, StateMeta(6, "L", "b"), ref)
    with pytest.raises(LockConflict, match="not held"):
        decide_write(None, None, "L1", "ann", latest, StateMeta(6, "L", "b"), ref)


# ---------------------------------------------------------------- auth and access


async def test_basic_auth_takes_the_token_as_password_and_bearer_still_works(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    for user in ("terraform", "ann", "", "someone@example.com"):
        r = await client.get("/workspaces/prod/tfstate", headers=basic(tokens["ann"], user))
        assert r.status_code == 200, (user, r.text)
    bearer = await client.get(
        "/workspaces/prod/tfstate", headers={"Authorization": f"Bearer {tokens['ann']}"}
    )
    assert bearer.status_code == 200 and bearer.content == tfstate(1)
    assert bearer.headers["content-md5"] == md5(tfstate(1))["Content-MD5"]
    assert bearer.headers["cache-control"] == "no-store"
    for headers in (
        {},
        basic("tfd_not-a-token"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(tokens["ann"].encode()).decode()},  # no ':'
    ):
        r = await client.get("/workspaces/prod/tfstate", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith('Basic realm="tfdeploy"')
        assert r.json()["status_code"] == 401
    # Basic auth is for the backend's routes only.
    r = await client.get("/workspaces/prod/state", headers=basic(tokens["ann"]))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


async def test_another_users_workspace_is_404_on_every_backend_route_and_writes_nothing(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann, bob = Cli(client, tokens["ann"]), Cli(client, tokens["bob"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    assert (await ann.lock("prod", "L1")).status_code == 200
    before = await lock_rows(services), await events_of(services, (await find(services, "ann", "prod")).id)
    for ref in ("ann:prod", "ann:nothing"):
        for response in (
            await bob.get(ref),
            await bob.put(ref, tfstate(2)),
            await bob.put(ref, tfstate(2), "L1"),
            await bob.lock(ref, "B1"),
            await bob.lock(ref, "L1"),
            await bob.unlock(ref, "L1"),
            await bob.unlock(ref, None),
        ):
            assert response.status_code == 404, (ref, response.request.method, response.text)
            assert response.json()["detail"] == "workspace not found"
    prod = await find(services, "ann", "prod")
    assert (await lock_rows(services), await events_of(services, prod.id)) == before


async def test_roles_read_members_read_deploy_members_lock_and_write(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    prod = await find(services, "ann", "prod")
    await workspaces.set_member(services.pool, prod, "bob", "read", "user:ann")
    await workspaces.set_member(services.pool, prod, "cat", "deploy", "user:ann")
    bob, cat = Cli(client, tokens["bob"]), Cli(client, tokens["cat"])
    assert (await bob.get("ann:prod")).status_code == 200
    for refused in (
        await bob.put("ann:prod", tfstate(2)),
        await bob.lock("ann:prod", "B1"),
        await bob.unlock("ann:prod", "B1"),
    ):
        assert refused.status_code == 403, refused.text
    assert (await cat.lock("ann:prod", "C1")).status_code == 200
    assert (await cat.put("ann:prod", tfstate(2), "C1")).status_code == 200
    # Only an admin force-unlocks: not the owner, not the holder.
    for who in (ann, cat):
        refused = await who.unlock("ann:prod", None)
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert (await cat.unlock("ann:prod", "C1")).status_code == 200
    types = [t for t, _, _ in await events_of(services, prod.id)]
    assert types[-3:] == ["StateLocked", "StateWritten", "StateUnlocked"]


async def test_a_lock_or_a_write_to_ones_own_new_name_makes_the_workspace(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.get("fresh")).status_code == 404  # terraform: no state yet
    assert (await ann.lock("fresh", "L1")).status_code == 200
    fresh = await find(services, "ann", "fresh")
    assert [(t, a) for t, a, _ in await events_of(services, fresh.id)] == [
        ("WorkspaceCreated", "cli:ann"),
        ("StateLocked", "cli:ann"),
    ]
    assert (await events_of(services, fresh.id))[0][2]["deploy_id"] == ""
    assert (await ann.get("fresh")).status_code == 204
    # A write makes one too; two racing for one new name make one workspace.
    got = await asyncio.gather(*(ann.put("pushed", tfstate(3, "imported")) for _ in range(4)))
    assert sorted(r.status_code for r in got) == [200] * 4, [r.text for r in got]
    assert sorted(r.json()["created"] for r in got) == [False, False, False, True]
    pushed = await find(services, "ann", "pushed")
    assert [t for t, _, _ in await events_of(services, pushed.id)] == ["WorkspaceCreated", "StateWritten"]
    # Nobody makes one for someone else, an admin included.
    root = Cli(client, tokens["root"])
    assert (await root.lock("ann:other", "R1")).status_code == 404
    assert (await root.put("ann:other", tfstate(1))).status_code == 404


# ---------------------------------------------------------------- writes


async def test_writes_content_md5_shape_size_lineage_and_serial(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    first = await ann.put("prod", tfstate(3))
    assert first.status_code == 200 and first.json()["created"] and first.json()["version"] == 1
    prod = await find(services, "ann", "prod")

    async def versions() -> int:
        async with services.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM state_versions WHERE workspace = %s", (prod.id,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    # Content-MD5 that does not match: 400, nothing written.
    body = tfstate(4)
    r = await client.post(
        "/workspaces/prod/tfstate", content=body, headers=basic(tokens["ann"]) | md5(b"other")
    )
    assert r.status_code == 400 and "Content-MD5" in r.json()["detail"]
    r = await client.post(
        "/workspaces/prod/tfstate", content=body, headers=basic(tokens["ann"]) | {"Content-MD5": "%%"}
    )
    assert r.status_code == 400
    # Not a tfstate: 422; too large: 413.
    for bad in (b"{}", b"[1]", b"not json", json.dumps({"version": 3, "serial": 1, "lineage": "x"}).encode()):
        r = await ann.put("prod", bad)
        assert r.status_code == 422, (bad, r.text)
    huge = tfstate(9).replace(b'"outputs": {}', b'"outputs": {"big": {"value": "' + b"x" * (65 << 20) + b'"}}')
    r = await client.post("/workspaces/prod/tfstate", content=huge, headers=basic(tokens["ann"]))
    assert r.status_code == 413
    # Another lineage, an older serial, the same serial with other content: 409.
    for bad in (tfstate(4, "lineage-2"), tfstate(2), tfstate(3, name="other")):
        r = await ann.put("prod", bad)
        assert r.status_code == 409, r.text
    assert await versions() == 1
    # The same content again (a retried write): 200, no new version.
    again = await ann.put("prod", tfstate(3))
    assert again.status_code == 200 and again.json() | {"created": None} == first.json() | {"created": None}
    assert again.json()["created"] is False
    assert (await ann.put("prod", tfstate(4))).json()["version"] == 2
    assert await versions() == 2
    # The versions list says who wrote them.
    listed = await client.get("/workspaces/prod/states", headers={"Authorization": f"Bearer {tokens['ann']}"})
    top = listed.json()["items"][0]
    assert (top["source"], top["written_by"], top["deploy_id"], top["attempt"]) == ("cli", "ann", None, None)
    # StateWritten for each version, nothing for the refusals.
    written = [d for t, _, d in await events_of(services, prod.id) if t == "StateWritten"]
    assert [(d["state_version"], d["serial"], d["lock_id"]) for d in written] == [(1, 3, ""), (2, 4, "")]
    assert written[0]["sha256"] == hashlib.sha256(tfstate(3)).hexdigest()


async def test_a_write_while_locked_needs_the_holders_id(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    prod = await find(services, "ann", "prod")
    await workspaces.set_member(services.pool, prod, "cat", "deploy", "user:ann")
    cat = Cli(client, tokens["cat"])
    assert (await ann.lock("prod", "L1")).status_code == 200
    for who, lock_id in ((ann, ""), (ann, "L2"), (cat, ""), (cat, "L1")):
        r = await who.put("ann:prod", tfstate(2), lock_id)
        assert r.status_code == 423, r.text
        assert r.json()["ID"] == "L1" and r.json()["Who"] == "ann@laptop"
    assert (await ann.put("prod", tfstate(2), "L1")).status_code == 200
    assert (await ann.unlock("prod", "L1")).status_code == 200
    # A write under a lock that is no longer held: the writer's view may be stale.
    r = await ann.put("prod", tfstate(3), "L1")
    assert r.status_code == 409 and "not held" in r.json()["detail"]
    assert (await ann.put("prod", tfstate(3))).status_code == 200


# ---------------------------------------------------------------- one lock with the deploy queue


async def test_lock_unlock_repeat_and_conflicts(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    prod = await find(services, "ann", "prod")
    taken = await ann.lock("prod", "L1")
    assert taken.status_code == 200 and taken.json()["ID"] == "L1"
    # A LOCK whose answer was lost, sent again with the same ID: 200, nothing new.
    assert (await ann.lock("prod", "L1")).status_code == 200
    held = await ann.lock("prod", "L2")
    assert held.status_code == 423
    assert held.json()["ID"] == "L1" and held.json()["status_code"] == 423
    wrong = await ann.unlock("prod", "L2")
    assert wrong.status_code == 409 and wrong.json()["ID"] == "L1"
    # POST and DELETE are the same as LOCK and UNLOCK.
    assert (await ann.lock("prod", "L1", method="POST")).status_code == 200
    assert (await ann.unlock("prod", "L1", method="DELETE")).json() == {"released": "L1"}
    # Unlocking again (a lost answer retried) finds nothing held: 200.
    assert (await ann.unlock("prod", "L1")).json() == {"released": None}
    assert (await ann.lock("prod", "L2", method="POST")).status_code == 200
    assert await lock_rows(services) == [(prod.id, "L2", "ann")]
    kinds = [(t, a, d.get("lock_id")) for t, a, d in await events_of(services, prod.id)]
    assert [k for k in kinds if k[0] != "StateWritten"][1:] == [
        ("StateLocked", "cli:ann", "L1"),
        ("StateUnlocked", "cli:ann", "L1"),
        ("StateLocked", "cli:ann", "L2"),
    ]
    # LOCK is a method of the lock path only.
    r = await client.request("LOCK", "/workspaces/prod/tfstate", headers=basic(tokens["ann"]))
    assert r.status_code == 405


async def test_two_clis_racing_for_the_lock_one_wins(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    for round_ in range(3):
        got = await asyncio.gather(*(ann.lock("prod", f"R{round_}-{i}") for i in range(6)))
        codes = sorted(r.status_code for r in got)
        assert codes == [200] + [423] * 5, codes
        winner = next(r for r in got if r.status_code == 200).json()["ID"]
        assert {r.json()["ID"] for r in got} == {winner}
        assert (await ann.unlock("prod", winner)).status_code == 200


async def test_a_running_or_planned_deploy_holds_the_workspace_against_lock_and_write(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    worker_id = await services.queue.app.job_manager.register_worker()
    q = Queue(services, worker_id)
    ann = Cli(client, tokens["ann"])
    assert (await ann.put("site", tfstate(1))).status_code == 200
    d = await q.request("d", "ann", "site")
    # Queued: the CLI may lock (the deploy waits for it).
    assert (await ann.lock("site", "L1")).status_code == 200
    assert (await ann.unlock("site", "L1")).status_code == 200
    # Claimed (its job taken), even before Started: 423 naming the deploy.
    name, job = await q.claim()
    assert name == "d" and job is not None
    held = await ann.lock("site", "L1")
    assert held.status_code == 423 and held.json()["ID"] == f"deploy:{d}"
    assert held.json()["Path"] == "ann:site" and "running" in held.json()["Info"]
    write = await ann.put("site", tfstate(2))
    assert write.status_code == 423 and write.json()["ID"] == f"deploy:{d}"
    # Not the CLI's to force-unlock.
    forced = await Cli(client, tokens["root"]).unlock("ann:site", None)
    assert forced.status_code == 409 and "cancel" in forced.json()["detail"]
    await q.run_to_success(d, job)
    assert (await ann.lock("site", "L1")).status_code == 200
    assert (await ann.unlock("site", "L1")).status_code == 200
    # A plan waiting for approval holds it too; a speculative plan neither holds nor waits.
    p = await q.request("p", "ann", "site", auto_approve=False)
    _, job = await q.claim()
    await services.deploys.execute(p, StartAttempt(worker="w"), "worker:w")
    await services.deploys.execute(
        p, PlanMade(summary=PlanSummary(add=1), changes=[], plan_id="plan:1"), "worker:w"
    )
    await q.finish(job)  # type: ignore[arg-type]
    planned = await ann.lock("site", "L1")
    assert planned.status_code == 423 and "approval" in planned.json()["Info"]
    await services.deploys.execute(p, Discard(by="user:ann"), "user:ann")
    spec = await q.request("spec", "ann", "site", action="plan")
    assert await q.claims(1) == ["spec"]
    assert (await ann.lock("site", "L1")).status_code == 200
    assert spec


async def test_the_claim_skips_a_workspace_the_cli_holds_and_unlock_wakes_the_dispatchers(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient, database_url: str
) -> None:
    worker_id = await services.queue.app.job_manager.register_worker()
    q = Queue(services, worker_id)
    ann = Cli(client, tokens["ann"])
    assert (await ann.lock("site", "L1")).status_code == 200
    await q.request("d", "ann", "site")
    await q.request("elsewhere", "ann", "other")
    # The claim takes the other workspace's deploy, never the held one's.
    assert await q.claims(2) == ["elsewhere", None]
    # UNLOCK notifies the dispatchers in its transaction; the deploy is then claimed.
    woken = await notifications(database_url, "tfdeploy_dispatch", lambda: ann.unlock("site", "L1"))
    assert woken >= 1
    assert await q.claims(1) == ["d"]


async def test_a_lock_and_a_claim_never_interleave(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    """A LOCK racing claims of the same workspace: either the LOCK wins (the claim then takes
    nothing) or the claim does (the LOCK then answers 423): never both."""
    worker_id = await services.queue.app.job_manager.register_worker()
    q = Queue(services, worker_id)
    ann = Cli(client, tokens["ann"])
    outcomes = set()

    async def claim_after(delay: float) -> tuple[str | None, int | None]:
        await asyncio.sleep(delay)
        return await q.claim()
    for i in range(12):
        ref = f"race{i}"
        assert (await ann.lock(ref, "setup")).status_code == 200
        assert (await ann.unlock(ref, "setup")).status_code == 200
        await q.request(f"d{i}", "ann", ref)
        # The claim starts a little later each round, so each side wins some rounds.
        locked, (claimed, job) = await asyncio.gather(
            ann.lock(ref, f"L{i}"), claim_after((i % 6) * 0.003)
        )
        assert (locked.status_code == 200) != (claimed is not None), (locked.text, claimed)
        outcomes.add(locked.status_code)
        if job is None:  # the LOCK won: the deploy is claimed once it is released
            assert (await ann.unlock(ref, f"L{i}")).status_code == 200
            claimed, job = await q.claim()
        assert claimed == f"d{i}" and job is not None
        await q.run_to_success(next(d for d, n in q.names.items() if n == claimed), job)
    assert outcomes  # (which one wins is up to the scheduler)


# ---------------------------------------------------------------- the audit trail


async def test_cli_events_are_in_the_audit_query_and_the_global_feed(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.lock("prod", "L1")).status_code == 200
    assert (await ann.put("prod", tfstate(1), "L1")).status_code == 200
    assert (await ann.get("prod")).status_code == 200
    assert (await ann.unlock("prod", "L1")).status_code == 200
    assert (await ann.lock("prod", "L2")).status_code == 200
    assert (await Cli(client, tokens["root"]).unlock("ann:prod", None)).status_code == 200
    prod = await find(services, "ann", "prod")
    expected = [
        ("WorkspaceCreated", "cli:ann"),
        ("StateLocked", "cli:ann"),
        ("StateWritten", "cli:ann"),
        ("StateDownloaded", "cli:ann"),
        ("StateUnlocked", "cli:ann"),
        ("StateLocked", "cli:ann"),
        ("StateForceUnlocked", "cli:root"),
    ]
    for token in (tokens["ann"], tokens["root"]):
        r = await client.get(
            "/events", params={"workspace": "ann:prod"}, headers={"Authorization": f"Bearer {token}"}
        )
        items = r.json()["items"]
        assert [(e["type"], e["actor"]) for e in items] == expected
        assert {(e["stream"], e["workspace_id"], e["deploy_id"]) for e in items} == {("workspace", prod.id, None)}
    by_type = {t: d for t, _, d in await events_of(services, prod.id)}
    assert by_type["StateDownloaded"]["via"] == "cli"
    assert by_type["StateForceUnlocked"] | {"held_since": ""} == {
        "lock_id": "L2", "holder": "ann", "held_since": "", "via": "cli"
    }
    assert by_type["StateLocked"]["operation"] == "OperationTypeApply"
    # The global feed (what GET /events/stream sends) has them, in order.
    async with services.pool.connection() as conn:
        from service import store

        feed = [(e.type, e.actor) for e in await store.read_all_after(conn, 0) if e.deploy_id == prod.id]
    assert feed == expected


async def test_tfdeploy_workspace_unlock_from_the_shell(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient, database_url: str
) -> None:
    ann = Cli(client, tokens["ann"])
    assert (await ann.lock("prod", "L1")).status_code == 200
    env = {**os.environ, "TFDEPLOY_DATABASE_URL": database_url, "USER": "ops"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "workspace", "unlock", *args],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )

    done = await asyncio.to_thread(run, "ann:prod")
    assert done.returncode == 0, done.stderr
    assert "unlocked: lock L1 of ann" in done.stdout
    assert await lock_rows(services) == []
    prod = await find(services, "ann", "prod")
    last = (await events_of(services, prod.id))[-1]
    assert last[0] == "StateForceUnlocked" and last[1] == "admin:ops" and last[2]["via"] == "shell"
    again = await asyncio.to_thread(run, "ann:prod")
    assert again.returncode == 0 and "was not locked" in again.stdout
    missing = await asyncio.to_thread(run, "ann:nothing")
    assert missing.returncode == 1 and "no workspace" in missing.stderr
    assert (await asyncio.to_thread(run, "prod")).returncode == 2
