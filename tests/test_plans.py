"""Plans end to end: HTTP in, a real worker, real terraform (local in bubblewrap, Docker with the
test image). CONTRACT "Plans and approval": plan -> approve -> apply; discard; speculative plans;
a stale plan refused; the re-plan rule with a tainted resource (applied without asking again)
and with a plan that goes beyond the approved changes (planned again)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from test_execution import ONE_RESOURCE, RUNNERS, SLOW, harness

from service.secrets import KeyRing
from service.statestores import index, make_state_store

PLANNED_OR_TERMINAL = {"planned", "succeeded", "failed", "cancelled", "discarded"}

# Two resources, one output, one sensitive output: the plan must show addresses and actions, and
# no value (the variable's value, the sensitive output's) anywhere.
TWO_AND_OUTPUTS = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" { command = "echo creating ${self.input}" }
}
resource "terraform_data" "db" {
  input = "db-${var.name}"
}
output "url" { value = "https://${var.name}.example" }
output "password" {
  value     = "pw-${var.name}"
  sensitive = true
}
"""

# Its create-time provisioner fails until the time in var.until (epoch seconds), then succeeds:
# the failed apply leaves terraform_data.web tainted, and the next plan replaces it.
FAILS_UNTIL = """
variable "until" {}
resource "terraform_data" "web" {
  input = "web"
  provisioner "local-exec" { command = "test $(date +%s) -ge ${var.until} || exit 3" }
}
"""

# terraform_data.stamp's input is timestamp(): made by the failed apply, the next plan updates
# it, which the approved plan (create) did not say.
BEYOND_APPROVED = """
resource "terraform_data" "stamp" {
  input = timestamp()
}
resource "terraform_data" "bad" {
  provisioner "local-exec" { command = "echo failing; exit 3" }
}
"""


async def wait_status(h, deploy_id: str, wanted: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = (await h.client.get(f"/deploys/{deploy_id}")).json()
        if d["status"] in wanted:
            return d
        await asyncio.sleep(0.05)
    raise AssertionError(f"deploy {deploy_id} still {d['status']} after {timeout}s")


async def types_of(h, deploy_id: str) -> list[str]:
    return [e["type"] for e in await h.events(deploy_id)]


async def saved_plans(h, deploy_id: str) -> list[bytes]:
    async with h.services.pool.connection() as conn:
        cur = await conn.execute("SELECT content FROM saved_plans WHERE deploy_id = %s", (deploy_id,))
        return [bytes(r[0]) for r in await cur.fetchall()]


async def state_versions(h, ref: str) -> list[int]:
    r = await h.client.get(f"/workspaces/{ref}/states")
    if r.status_code == 404:
        return []
    return [v["version"] for v in r.json()["items"]]


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_plan_then_approve_applies_exactly_the_saved_plan(
    database_url, tmp_path, runner_kind, runner_image
):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit(
            {"main.tf": TWO_AND_OUTPUTS},
            workspace="site",
            variables={"name": "zebra-17"},
            auto_approve=False,
        )
        planned = await wait_status(h, d["id"], PLANNED_OR_TERMINAL)
        assert planned["status"] == "planned", planned
        assert await types_of(h, d["id"]) == ["Requested", "Started", "Planned"]
        # Nothing applied yet: no state, nothing created.
        assert await state_versions(h, "site") == []
        assert "creating zebra-17" not in await h.logs(d["id"])

        r = await h.client.get(f"/deploys/{d['id']}/plan")
        assert r.status_code == 200, r.text
        plan = r.json()
        assert plan["summary"] == {"add": 2, "change": 0, "destroy": 0}
        assert sorted((c["address"], c["type"], c["actions"]) for c in plan["changes"]) == [
            ("terraform_data.db", "terraform_data", ["create"]),
            ("terraform_data.web", "terraform_data", ["create"]),
        ]
        assert plan["awaits_approval"] is True and plan["base_state_version"] is None
        # No value anywhere: not in /plan, not in the Planned event (the variables are the
        # Requested event's, as always).
        (planned_event,) = [e for e in await h.events(d["id"]) if e["type"] == "Planned"]
        for text in (r.text, json.dumps(planned_event)):
            assert "zebra-17" not in text and "pw-" not in text and "example" not in text
        # The saved plan is kept sealed: the variable's value is not in its bytes.
        (sealed,) = await saved_plans(h, d["id"])
        assert b"zebra-17" not in sealed and KeyRing.is_sealed(sealed)

        r = await h.client.post(f"/deploys/{d['id']}/approve")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        done = await h.wait(d["id"])
        assert done["status"] == "succeeded", done
        events = await h.events(d["id"])
        assert [(e["type"], e["data"].get("step")) for e in events] == [
            ("Requested", None),
            ("Started", "plan"),
            ("Planned", None),
            ("Approved", None),
            ("Started", "apply"),
            ("StatePersisted", None),
            ("Succeeded", None),
        ]
        approved = events[3]
        assert approved["actor"] == "user:ann" and approved["data"]["by"] == "user:ann"
        assert approved["data"]["rule"] == ""
        assert "creating zebra-17" in await h.logs(d["id"])
        state = (await h.client.get("/workspaces/site/state")).json()
        assert sorted(r["name"] for r in state["resources"]) == ["db", "web"]
        outputs = (await h.client.get("/workspaces/site/outputs")).json()["outputs"]
        assert outputs["url"]["value"] == "https://zebra-17.example"
        assert outputs["password"] == {"value": None, "type": "string", "sensitive": True}
        # The saved plan is forgotten once the deploy ended; approving again is a conflict.
        assert await saved_plans(h, d["id"]) == []
        again = await h.client.post(f"/deploys/{d['id']}/approve")
        assert again.status_code == 409, again.text

        # The next plan of the workspace is made against version 1 and has nothing to do.
        d2 = await h.submit({"main.tf": TWO_AND_OUTPUTS}, workspace="site",
                            variables={"name": "zebra-17"}, auto_approve=False)
        done2 = await h.wait(d2["id"])
        assert done2["status"] == "succeeded"
        assert await types_of(h, d2["id"]) == ["Requested", "Started", "Planned", "Succeeded"]
        plan2 = (await h.client.get(f"/deploys/{d2['id']}/plan")).json()
        assert plan2["changed"] is False and plan2["changes"] == []
        assert plan2["base_state_version"] == 1
        assert await state_versions(h, "site") == [1]


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_discarded_plan_applies_nothing(database_url, tmp_path, runner_kind, runner_image):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", auto_approve=False)
        assert (await wait_status(h, d["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        r = await h.client.post(f"/deploys/{d['id']}/discard")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "discarded"
        assert r.json()["error"] == {"reason": "discarded", "message": "plan discarded by user:ann"}
        assert await types_of(h, d["id"]) == ["Requested", "Started", "Planned", "Discarded"]
        assert await saved_plans(h, d["id"]) == []
        for verb in ("approve", "discard"):
            again = await h.client.post(f"/deploys/{d['id']}/{verb}")
            assert again.status_code == 409, again.text
        await asyncio.sleep(0.5)  # no job is left to run it
        assert (await h.client.get(f"/deploys/{d['id']}")).json()["status"] == "discarded"
        assert await state_versions(h, "site") == []
        assert "creating" not in await h.logs(d["id"])


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_speculative_plan_changes_nothing_and_keeps_nothing(
    database_url, tmp_path, runner_kind, runner_image
):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        first = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", variables={"name": "a"})
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        before = (await h.client.get("/workspaces/site/state")).content

        d = await h.submit(
            {"main.tf": ONE_RESOURCE}, workspace="site", variables={"name": "b"}, action="plan"
        )
        done = await h.wait(d["id"])
        assert done["status"] == "succeeded" and done["action"] == "plan", done
        events = await h.events(d["id"])
        assert [e["type"] for e in events] == ["Requested", "Started", "Planned", "Succeeded"]
        planned = events[2]["data"]
        assert planned["awaits_approval"] is False and planned["plan_id"] == ""
        assert planned["base_state_version"] == 1
        plan = (await h.client.get(f"/deploys/{d['id']}/plan")).json()
        assert plan["summary"] == {"add": 0, "change": 1, "destroy": 0}
        assert plan["changes"] == [
            {"address": "terraform_data.web", "type": "terraform_data", "actions": ["update"], "tainted": False}
        ]
        # Nothing applied, nothing kept.
        assert await state_versions(h, "site") == [1]
        assert (await h.client.get("/workspaces/site/state")).content == before
        assert await saved_plans(h, d["id"]) == []
        assert "creating b" not in await h.logs(d["id"])


async def test_a_speculative_plan_does_not_wait_behind_a_running_deploy(
    database_url, tmp_path, runner_image
):
    """Speculative plans never wait for their workspace. The worker today: the plan's job has no
    workspace lock, so procrastinate's fetch takes it while the slow apply holds the lock. With
    the lead's dispatcher the claim (tfdeploy_claim: action 'plan' may always start) keeps it."""
    async with harness(database_url, tmp_path, "local", runner_image, max_concurrency=2) as h:
        slow = await h.submit({"main.tf": SLOW}, workspace="site")
        await wait_status(h, slow["id"], {"deploying"})
        plan = await h.submit({"main.tf": SLOW}, workspace="site", action="plan")
        done = await h.wait(plan["id"])
        assert done["status"] == "succeeded", done
        # The plan ended while the apply still ran (it sleeps 2 s).
        assert (await h.client.get(f"/deploys/{slow['id']}")).json()["status"] == "deploying"
        assert (await h.wait(slow["id"]))["status"] == "succeeded"


async def test_a_planned_deploy_holds_its_workspace_until_it_is_discarded(
    database_url, tmp_path, runner_image
):
    async with harness(database_url, tmp_path, "local", runner_image) as h:
        planned = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", auto_approve=False)
        assert (await wait_status(h, planned["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        later = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", variables={"name": "b"})
        # A speculative plan of the same workspace does not wait.
        plan = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", action="plan")
        assert (await h.wait(plan["id"]))["status"] == "succeeded"
        await asyncio.sleep(2.0)
        # THE ASSERTION THAT WAITS FOR THE DISPATCHER: the later deploy is still queued.
        assert (await h.client.get(f"/deploys/{later['id']}")).json()["status"] == "queued"
        assert await state_versions(h, "site") == []
        assert (await h.client.post(f"/deploys/{planned['id']}/discard")).status_code == 202
        assert (await h.wait(later["id"]))["status"] == "succeeded"
        assert await state_versions(h, "site") == [1]


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_stale_plan_is_refused(database_url, tmp_path, runner_kind, runner_image):
    """A state version written after the plan (as an admin's or the CLI's forced write would):
    approving is 409, nothing is applied; discarding still works."""
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site", auto_approve=False)
        assert (await wait_status(h, d["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        view = (await h.client.get(f"/deploys/{d['id']}")).json()
        content = (
            b'{"version": 4, "terraform_version": "1.11.4", "serial": 1, "lineage": "forced", '
            b'"outputs": {}, "resources": []}'
        )
        serial, lineage, sha, size = index.state_meta(content)
        store = make_state_store(h.services.settings, h.services.pool)
        async with h.services.pool.connection() as conn, conn.transaction():
            version = await index.next_version(conn, view["workspace_id"])
            stored = await store.put(view["workspace_id"], version, content, sha)
            await index.record_version(
                conn, view["workspace_id"], version, d["id"], 1, stored, serial, lineage, sha, size
            )
        r = await h.client.post(f"/deploys/{d['id']}/approve")
        assert r.status_code == 409, r.text
        assert "stale" in r.json()["detail"]
        assert (await h.client.get(f"/deploys/{d['id']}")).json()["status"] == "planned"
        assert await types_of(h, d["id"]) == ["Requested", "Started", "Planned"]
        r = await h.client.post(f"/deploys/{d['id']}/discard")
        assert r.status_code == 202 and r.json()["status"] == "discarded"
        assert await state_versions(h, "site") == [1]


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_failed_approved_apply_is_retried_within_the_approval(
    database_url, tmp_path, runner_kind, runner_image
):
    """The approved apply fails and leaves terraform_data.web tainted; the next attempt's plan
    replaces it, which the approved create covers: applied without asking again."""
    delay = 6.0
    async with harness(
        database_url, tmp_path, runner_kind, runner_image, retry_delay=delay
    ) as h:
        until = int(time.time()) + 5  # before the first apply, after the retry (delay 6 s)
        d = await h.submit(
            {"main.tf": FAILS_UNTIL}, workspace="site", variables={"until": str(until)},
            auto_approve=False,
        )
        assert (await wait_status(h, d["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        assert time.time() < until - 2, "planning took too long for this test's clock"
        r = await h.client.post(f"/deploys/{d['id']}/approve")
        assert r.status_code == 202, r.text
        done = await h.wait(d["id"], timeout=120)
        assert done["status"] == "succeeded", done
        events = await h.events(d["id"])
        assert [(e["type"], e["data"].get("attempt"), e["data"].get("step")) for e in events] == [
            ("Requested", None, None),
            ("Started", 1, "plan"),
            ("Planned", 1, None),
            ("Approved", 1, None),
            ("Started", 1, "apply"),
            ("StatePersisted", 1, None),  # what the failed apply left: web, tainted
            ("Failed", 1, None),
            ("Retried", 2, None),
            ("Started", 2, "plan"),
            ("Planned", 2, None),
            ("Approved", 2, None),
            ("Started", 2, "apply"),
            ("StatePersisted", 2, None),
            ("Succeeded", 2, None),
        ]
        replan = events[9]["data"]
        assert replan["awaits_approval"] is False
        assert replan["changes"] == [
            {"address": "terraform_data.web", "type": "terraform_data",
             "actions": ["delete", "create"], "tainted": True}
        ]
        assert events[10]["data"]["by"] == "system" and events[10]["data"]["rule"] == "within_approved"
        assert events[6]["data"]["reason"] == "apply_failed"
        state = (await h.client.get("/workspaces/site/state")).json()
        assert [r.get("instances", [{}])[0].get("status") for r in state["resources"]] == [None]


@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_new_plan_beyond_the_approved_changes_waits_for_approval_again(
    database_url, tmp_path, runner_kind, runner_image
):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        d = await h.submit({"main.tf": BEYOND_APPROVED}, workspace="site", auto_approve=False)
        assert (await wait_status(h, d["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        assert (await h.client.post(f"/deploys/{d['id']}/approve")).status_code == 202
        # The apply fails (bad); attempt 2 plans: stamp is updated -- not approved.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            view = (await h.client.get(f"/deploys/{d['id']}")).json()
            if view["status"] == "planned" and view["attempt"] == 2:
                break
            assert view["status"] not in ("succeeded", "failed"), view
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("never planned again")
        events = await h.events(d["id"])
        types = [e["type"] for e in events]
        assert types == [
            "Requested", "Started", "Planned", "Approved", "Started", "StatePersisted", "Failed",
            "Retried", "Started", "Planned",
        ]
        replan = events[-1]["data"]
        assert replan["awaits_approval"] is True and replan["attempt"] == 2
        actions = {c["address"]: c["actions"] for c in replan["changes"]}
        assert actions == {
            "terraform_data.stamp": ["update"],
            "terraform_data.bad": ["delete", "create"],
        }
        plan = (await h.client.get(f"/deploys/{d['id']}/plan")).json()
        assert plan["attempt"] == 2 and plan["summary"] == {"add": 1, "change": 1, "destroy": 1}
        # Only the new plan is kept for approval... and discarding it ends the deploy.
        assert len(await saved_plans(h, d["id"])) == 2
        assert (await h.client.post(f"/deploys/{d['id']}/discard")).status_code == 202
        assert await saved_plans(h, d["id"]) == []


async def test_a_destroy_waits_for_approval_and_applies_the_destroy_plan(
    database_url, tmp_path, runner_image
):
    async with harness(database_url, tmp_path, "local", runner_image) as h:
        first = await h.submit({"main.tf": ONE_RESOURCE}, workspace="site")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        d = await h.submit(
            {"main.tf": ONE_RESOURCE}, workspace="site", action="destroy", auto_approve=False
        )
        assert (await wait_status(h, d["id"], PLANNED_OR_TERMINAL))["status"] == "planned"
        plan = (await h.client.get(f"/deploys/{d['id']}/plan")).json()
        assert plan["summary"] == {"add": 0, "change": 0, "destroy": 1}
        assert plan["changes"][0]["actions"] == ["delete"]
        assert await state_versions(h, "site") == [1]
        assert (await h.client.post(f"/deploys/{d['id']}/approve")).status_code == 202
        assert (await h.wait(d["id"]))["status"] == "succeeded"
        state = (await h.client.get("/workspaces/site/state")).json()
        assert state["resources"] == []
        assert await state_versions(h, "site") == [2, 1]


async def test_a_dead_workers_plan_run_is_concluded_by_recovery(database_url, tmp_path):
    """Recovery prepares a running deploy's request without steps (service/recovery.py): the
    deployer composes the run the deploy is at -- its plan run (1), later its apply run (2)
    with the saved plan -- and concludes a plan run with PlanMade, its plan kept first."""
    from service.lifecycle import StartAttempt
    from service.services import open_services
    from service.settings import from_env
    from service.worker import Worker

    settings = from_env({}, data_dir=str(tmp_path / "data"), runner="local", runner_network="none")
    services = await open_services(settings, database_url)
    worker = Worker(services, name="recovering")  # not run: its deployer and runner only
    try:
        from service.deploys import NewDeploy

        new = NewDeploy(workspace="site", action="apply", files={"main.tf": ONE_RESOURCE},
                        max_attempts=3, auto_approve=False)
        view, _ = await services.deploys.request(new, owner="ann", actor="user:ann")
        await services.deploys.execute(view.id, StartAttempt(worker="dead"), "worker:dead")
        # What the dead worker ran: the request recovery composes is the same run.
        request = await worker.deployer.prepare(view.id, 1, "site", "apply")
        assert [s.name for s in request.steps] == ["init", "validate", "plan", "show_plan"]
        assert request.run == 1 and request.saved_plan is None
        slot = await worker.runner.acquire_slot(request)
        try:
            result = await worker.runner.run(slot, _ignore_line, asyncio.Event())
        finally:
            await slot.release()
        assert result.ok and result.plan is not None
        await worker.deployer.conclude_recovered(view.id, request, result, "worker lost: test")
        after = await services.deploys.get(view.id)
        assert after is not None and after.status == "planned"
        stream = await services.deploys.stream(view.id)
        assert [e.type for e in stream] == ["Requested", "Started", "Planned"]
        async with services.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM saved_plans WHERE deploy_id = %s", (view.id,))
            assert (await cur.fetchone())[0] == 1

        from service.lifecycle import Approve

        await services.deploys.execute(view.id, Approve(by="user:ann", state_version=None), "user:ann")
        await services.deploys.execute(view.id, StartAttempt(worker="dead"), "worker:dead")
        apply = await worker.deployer.prepare(view.id, 1, "site", "apply")
        assert [s.name for s in apply.steps] == ["init", "apply_plan"]
        assert apply.run == 2 and apply.saved_plan == result.plan
        assert apply.lock_file == result.lock_file
    finally:
        await worker.close()
        await services.close()


async def _ignore_line(stream: str, line: str) -> None:
    return None


async def test_an_approved_plan_whose_base_moved_or_that_is_gone_is_not_applied(database_url, tmp_path):
    """Right before the apply run starts, the deployer checks the saved plan again: a state
    version written after the approval (a forced write) fails the attempt as plan_stale, a
    missing plan as plan_missing -- before terraform runs; the next attempt plans again."""
    from uuid import uuid4

    from service import planning
    from service.deploys import NewDeploy
    from service.events import PlanSummary
    from service.lifecycle import Approve, PlanMade, StartAttempt
    from service.services import open_services
    from service.settings import from_env
    from service.worker import Worker

    settings = from_env({}, data_dir=str(tmp_path / "data"), runner="local", retry_delay=30)
    services = await open_services(settings, database_url)
    worker = Worker(services, name="direct")  # not run: its deployer handles the jobs here
    try:
        async def approved(workspace: str, *, keep: bool) -> str:
            new = NewDeploy(workspace=workspace, action="apply", files={"main.tf": ONE_RESOURCE},
                            max_attempts=3, auto_approve=False)
            view, _ = await services.deploys.request(new, owner="ann", actor="user:ann")
            await services.deploys.execute(view.id, StartAttempt(worker="w"), "worker:w")
            plan_id = str(uuid4())
            if keep:
                async with services.pool.connection() as conn:
                    plan_id, _ = await planning.save_plan(
                        conn, services.extras["keyring"], deploy_id=view.id, attempt=1,
                        plan=b"not applied", lock_file=None, base_state_version=None,
                    )
            await services.deploys.execute(
                view.id,
                PlanMade(summary=PlanSummary(add=1), plan_sha256="ab" * 32, plan_id=plan_id,
                         base_state_version=None),
                "worker:w",
            )
            await services.deploys.execute(view.id, Approve(by="user:ann", state_version=None), "user:ann")
            return view.id

        stale = await approved("moved", keep=True)
        view = await services.deploys.get(stale)
        assert view is not None
        content = b'{"version": 4, "serial": 1, "lineage": "forced", "outputs": {}, "resources": []}'
        serial, lineage, sha, size = index.state_meta(content)
        store = make_state_store(settings, services.pool)
        async with services.pool.connection() as conn, conn.transaction():
            version = await index.next_version(conn, view.workspace_id)
            stored = await store.put(view.workspace_id, version, content, sha)
            await index.record_version(conn, view.workspace_id, version, stale, 1, stored, serial,
                                       lineage, sha, size)
        gone = await approved("gone", keep=False)

        for deploy_id, reason in ((stale, "plan_stale"), (gone, "plan_missing")):
            await worker.deployer.handle(deploy_id, 1)
            stream = await services.deploys.stream(deploy_id)
            assert [e.type for e in stream][-4:] == ["Approved", "Started", "Failed", "Retried"]
            started, failed = stream[-3].data, stream[-2].data
            assert started["step"] == "apply" and started["attempt"] == 1
            assert failed["reason"] == reason and failed["final"] is False, failed
            after = await services.deploys.get(deploy_id)
            assert after is not None and after.status == "retrying"
            async with services.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM deploy_logs WHERE deploy_id = %s", (deploy_id,))
                assert (await cur.fetchone())[0] == 0  # terraform never ran
        assert "state version None" in (await services.deploys.stream(stale))[-2].data["message"]
    finally:
        await worker.close()
        await services.close()
