"""Plans and approval at the API, without terraform: the plan's JSON (reduced, no values), GET
/plan, approve and discard (409s, concurrent approvals, Idempotency-Key), the events on the SSE
stream and in the audit trail, the TTL (the function, and its periodic deferral by
procrastinate's real worker), the steps of each run, the CLI, and the recovery of a dead
worker's plan run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any
from uuid import uuid4

import httpx
import msgspec
import procrastinate
import pytest
from test_roles import served  # noqa: F401  (the fixture: the app behind uvicorn)

from service import planning, store
from service.deploys import NewDeploy
from service.events import PlanChange, PlanSummary
from service.lifecycle import Approve, Discard, IllegalTransition, PlanMade, StartAttempt, fold
from service.services import Services

MAIN_TF = 'resource "terraform_data" "x" {}\n'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def planned_deploy(
    services: Services, owner: str = "ann", *, workspace: str = "prod", base: int | None = None
) -> str:
    """A deploy of ``owner``'s that waits for approval (its plan run recorded by commands)."""
    new = NewDeploy(
        workspace=workspace, action="apply", files={"main.tf": MAIN_TF}, max_attempts=3,
        auto_approve=False,
    )
    view, _ = await services.deploys.request(new, owner=owner, actor=f"user:{owner}")
    await services.deploys.execute(view.id, StartAttempt(worker="w"), "worker:w")
    await services.deploys.execute(
        view.id,
        PlanMade(
            summary=PlanSummary(add=1),
            changes=[PlanChange(address="terraform_data.x", type="terraform_data", actions=["create"])],
            plan_sha256="ab" * 32,
            plan_id=str(uuid4()),
            base_state_version=base,
        ),
        "worker:w",
    )
    return view.id


async def event_types(services: Services, deploy_id: str) -> list[str]:
    async with services.pool.connection() as conn:
        return [e.type for e in await store.read_stream(conn, deploy_id)]


# ---------------------------------------------------------------- reading a plan (pure)


def plan_json(*changes: dict[str, Any], outputs: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"format_version": "1.2", "resource_changes": list(changes), "output_changes": outputs or {}}
    ).encode()


def rc(address: str, *actions: str, **extra: Any) -> dict[str, Any]:
    return {
        "address": address,
        "type": address.split(".")[-2] if "." in address else address,
        "change": {
            "actions": list(actions),
            "before": {"password": "hunter2"},
            "after": {"password": "correct horse"},
            "after_sensitive": {"password": True},
        },
        **extra,
    }


def test_a_plan_is_reduced_to_addresses_types_and_actions() -> None:
    reading = planning.read_plan(
        plan_json(
            rc("terraform_data.a", "create"),
            rc("module.net.terraform_data.b", "update"),
            rc("terraform_data.c", "delete", "create", action_reason="replace_because_tainted"),
            rc("terraform_data.d", "delete"),
            rc("terraform_data.same", "no-op"),
            rc("data.terraform_remote_state.r", "read"),
            rc("terraform_data.e", "delete", deposed="0af1"),
        )
    )
    assert reading.summary == PlanSummary(add=2, change=1, destroy=3)
    assert [(c.address, c.actions, c.tainted) for c in reading.changes] == [
        ("terraform_data.a", ["create"], False),
        ("module.net.terraform_data.b", ["update"], False),
        ("terraform_data.c", ["delete", "create"], True),
        ("terraform_data.d", ["delete"], False),
        ("data.terraform_remote_state.r", ["read"], False),
        ("terraform_data.e (deposed object 0af1)", ["delete"], False),
    ]
    assert reading.changed
    text = msgspec.json.encode(reading).decode()
    assert "hunter2" not in text and "horse" not in text


def test_nothing_to_do_and_outputs_only() -> None:
    nothing = planning.read_plan(plan_json(rc("terraform_data.a", "no-op")))
    assert nothing.changes == [] and not nothing.changed
    assert nothing.summary == PlanSummary()
    outputs = planning.read_plan(
        plan_json(outputs={"url": {"actions": ["update"], "before": "a", "after": "b"}})
    )
    assert outputs.changes == [] and outputs.changed


@pytest.mark.parametrize("raw", [b"", b"[]", b"not json", b'{"resource_changes": 3}', b"{}"])
def test_a_plan_that_is_not_terraforms_is_refused(raw: bytes) -> None:
    with pytest.raises(planning.PlanUnreadable):
        planning.read_plan(raw)


def test_each_run_has_its_steps() -> None:
    from service.events import Requested

    def state(action: str, auto_approve: bool) -> Any:
        return fold(
            [Requested(workspace="w", action=action, max_attempts=3, owner="ann",  # type: ignore[arg-type]
                       files={}, auto_approve=auto_approve)]
        )

    def names(steps: list[Any]) -> list[tuple[str, bool]]:
        return [(s.name, s.destroy) for s in steps]

    steps, run = planning.run_for(state("apply", True), "run")
    assert names(steps) == [("init", False), ("validate", False), ("apply", False)] and run == 1
    steps, run = planning.run_for(state("plan", True), "run")
    assert [s.name for s in steps] == ["init", "validate", "plan", "show_plan"] and run == 1
    assert planning.makes_plan(steps)
    steps, run = planning.run_for(state("destroy", False), "plan")
    assert names(steps) == [("init", False), ("validate", False), ("plan", True), ("show_plan", False)]
    assert run == planning.PLAN_RUN == 1
    steps, run = planning.run_for(state("apply", False), "apply")
    assert [s.name for s in steps] == ["init", "apply_plan"] and run == planning.APPLY_RUN == 2
    assert not planning.makes_plan(steps)


# ---------------------------------------------------------------- the routes


async def test_get_plan_is_404_before_a_plan_and_never_shows_a_value(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    new = NewDeploy(workspace="prod", action="apply", files={"main.tf": MAIN_TF}, max_attempts=3,
                    auto_approve=False)
    queued, _ = await services.deploys.request(new, owner="ann", actor="user:ann")
    r = await client.get(f"/deploys/{queued.id}/plan", headers=bearer(tokens["ann"]))
    assert r.status_code == 404 and r.json()["detail"] == "the deploy has no plan yet"
    d = await planned_deploy(services)
    r = await client.get(f"/deploys/{d}/plan", headers=bearer(tokens["ann"]))
    assert r.status_code == 200
    assert r.json() == {
        "summary": {"add": 1, "change": 0, "destroy": 0},
        "changes": [{"address": "terraform_data.x", "type": "terraform_data",
                     "actions": ["create"], "tainted": False}],
        "attempt": 1,
        "changed": True,
        "awaits_approval": True,
        "base_state_version": None,
    }
    # Someone else's deploy: as unknown.
    r = await client.get(f"/deploys/{d}/plan", headers=bearer(tokens["bob"]))
    assert r.status_code == 404


async def test_approve_and_discard_refuse_what_is_not_planned(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    new = NewDeploy(workspace="prod", action="apply", files={"main.tf": MAIN_TF}, max_attempts=3)
    queued, _ = await services.deploys.request(new, owner="ann", actor="user:ann")
    for verb in ("approve", "discard"):
        r = await client.post(f"/deploys/{queued.id}/{verb}", headers=bearer(tokens["ann"]))
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == f"cannot {verb} a deploy that is queued"
    d = await planned_deploy(services)
    r = await client.post(f"/deploys/{d}/approve", headers=bearer(tokens["ann"]))
    assert r.status_code == 202 and r.json()["status"] == "queued"
    r = await client.post(f"/deploys/{d}/approve", headers=bearer(tokens["ann"]))
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    r = await client.post(f"/deploys/{d}/discard", headers=bearer(tokens["ann"]))
    assert r.status_code == 409
    # The approval queued the apply run's job (attempt 1 again).
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT args FROM procrastinate_jobs WHERE args->>'deploy_id' = %s ORDER BY id", (d,)
        )
        jobs = [r[0] for r in await cur.fetchall()]
    assert jobs == [{"deploy_id": d, "attempt": 1}, {"deploy_id": d, "attempt": 1}]


async def test_exactly_one_of_concurrent_approvals_wins(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    d = await planned_deploy(services)
    answers = await asyncio.gather(
        *(
            client.post(f"/deploys/{d}/approve", headers=bearer(tokens[who]))
            for who in ("ann", "root") * 4
        )
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [409] * 7, [r.text for r in answers]
    assert (await event_types(services, d)).count("Approved") == 1


async def test_an_idempotency_key_answers_a_retry_as_the_first(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    d = await planned_deploy(services)
    key = {"Idempotency-Key": "approve-once-1", **bearer(tokens["ann"])}
    first = await client.post(f"/deploys/{d}/approve", headers=key)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = await client.post(f"/deploys/{d}/approve", headers=key)
    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == d and again.json()["status"] == "queued"
    assert (await event_types(services, d)).count("Approved") == 1
    # The same key for another request (a discard, another deploy) is refused; without the key
    # a second approval is the usual 409.
    other = await planned_deploy(services)
    for url in (f"/deploys/{d}/discard", f"/deploys/{other}/approve"):
        r = await client.post(url, headers=key)
        assert r.status_code == 422, r.text
    assert (await client.post(f"/deploys/{d}/approve", headers=bearer(tokens["ann"]))).status_code == 409
    # Keys are per user, and apart from POST /deploys' keys.
    r = await client.post(f"/deploys/{other}/approve",
                          headers={"Idempotency-Key": "approve-once-1", **bearer(tokens["root"])})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    r = await client.post("/deploys", json={"files": {"main.tf": MAIN_TF}},
                          headers=key)
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    for bad in ("", "x" * 201, "tab\there"):
        r = await client.post(f"/deploys/{other}/discard",
                              headers={"Idempotency-Key": bad, **bearer(tokens["ann"])})
        assert r.status_code in (400, 422), (bad, r.status_code)


async def test_concurrent_retries_with_one_key_act_once_and_all_answer_202(
    services: Services, tokens: dict[str, str], client: httpx.AsyncClient
) -> None:
    d = await planned_deploy(services)
    key = {"Idempotency-Key": "discard-xyz", **bearer(tokens["ann"])}
    answers = await asyncio.gather(*(client.post(f"/deploys/{d}/discard", headers=key) for _ in range(6)))
    assert [r.status_code for r in answers] == [202] * 6, [r.text for r in answers]
    assert sum("idempotent-replayed" not in r.headers for r in answers) == 1
    assert {r.json()["status"] for r in answers} == {"discarded"}
    assert (await event_types(services, d)).count("Discarded") == 1


async def test_approval_is_on_the_stream_and_in_the_audit_with_who(
    services: Services, tokens: dict[str, str], served: httpx.AsyncClient  # noqa: F811
) -> None:
    d = await planned_deploy(services)
    r = await served.post(f"/deploys/{d}/approve", headers=bearer(tokens["root"]))
    assert r.status_code == 202
    seen: list[tuple[str, dict[str, Any]]] = []
    async with served.stream("GET", f"/deploys/{d}/stream", headers=bearer(tokens["ann"])) as s:
        kind = ""
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind not in ("", "log"):
                seen.append((kind, json.loads(line[5:])))
                if kind == "Approved":
                    break
    assert [k for k, _ in seen] == ["Requested", "Started", "Planned", "Approved"]
    approved = seen[-1][1]
    assert approved["event"]["actor"] == "admin:root"
    assert approved["event"]["data"]["by"] == "admin:root"
    assert approved["deploy"]["status"] == "queued"
    audit = await served.get("/events", params={"type": "Approved"}, headers=bearer(tokens["ann"]))
    assert [(e["deploy_id"], e["actor"]) for e in audit.json()["items"]] == [(d, "admin:root")]


# ---------------------------------------------------------------- the TTL


async def test_plans_left_unapproved_past_the_ttl_are_discarded(services: Services) -> None:
    old = await planned_deploy(services)
    approved = await planned_deploy(services, workspace="other")
    await asyncio.sleep(0.4)
    fresh = await planned_deploy(services, workspace="third")
    await services.deploys.execute(
        approved, Approve(by="user:ann", state_version=None), "user:ann"
    )
    expired = await planning.expire_plans(services.deploys, ttl=0.3)
    assert expired == [old]
    view = await services.deploys.get(old)
    assert view is not None and view.status == "discarded"
    assert view.error is not None and view.error.reason == "expired"
    async with services.pool.connection() as conn:
        last = (await store.read_stream(conn, old))[-1]
    assert (last.type, last.actor, last.data) == (
        "Discarded", "system:ttl", {"by": "system:ttl", "reason": "expired"}
    )
    for other, status in ((approved, "queued"), (fresh, "planned")):
        got = await services.deploys.get(other)
        assert got is not None and got.status == status
    assert await planning.expire_plans(services.deploys, ttl=3600) == []


async def test_the_ttl_check_leaves_a_plan_made_after_the_cutoff(services: Services) -> None:
    """The select and the append are apart: a deploy planned again in between is not discarded."""
    d = await planned_deploy(services)
    async with services.pool.connection() as conn:
        cur = await conn.execute("SELECT now() - interval '1 hour'")
        (long_ago,) = await cur.fetchone()
    check = planning._unapproved_since(long_ago)
    with pytest.raises(IllegalTransition):
        await services.deploys.execute(d, Discard(by="system:ttl", reason="expired"),
                                       "system:ttl", check=check)
    got = await services.deploys.get(d)
    assert got is not None and got.status == "planned"


async def test_the_ttl_task_runs_periodically_on_procrastinates_worker(
    services: Services, database_url: str
) -> None:
    d = await planned_deploy(services)
    queue = f"plans-ttl-{os.getpid()}"
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))
    task = planning.register_plan_expiry(app, services.deploys, 0.2, queue=queue, cron="* * * * * *")
    assert task.name == planning.EXPIRY_TASK and task.queue == queue
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(queues=[queue], name="ttl-test", install_signal_handlers=False)
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                got = await services.deploys.get(d)
                if got is not None and got.status == "discarded":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the periodic task never discarded the plan")
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), min(queue_name), bool_and(status = 'succeeded') FROM procrastinate_jobs "
            "WHERE task_name = %s AND status <> 'todo'",
            (planning.EXPIRY_TASK,),
        )
        n, queue_name, all_ok = await cur.fetchone()
        cur = await conn.execute(
            "SELECT count(*) FROM procrastinate_periodic_defers WHERE task_name = %s",
            (planning.EXPIRY_TASK,),
        )
        (defers,) = await cur.fetchone()
    assert n >= 1 and queue_name == queue and all_ok and defers >= 1
    assert (await event_types(services, d))[-1] == "Discarded"
