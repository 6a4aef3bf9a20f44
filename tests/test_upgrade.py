"""The upgrade from the previous version, on a database that version made and filled.

``old_database`` builds it once per module with the PREVIOUS main's own code (``git archive
e26d995``), run in a subprocess with ``PYTHONPATH`` pointing at it and this venv: its migrations,
its tokens, its command handler and its worker running real terraform with the local runner. It
holds tokens of two users and an admin (and a user whose only token was revoked), deploys of both
users in one shared workspace name and in their own, persisted states, logs, a failed deploy, and
two deploys still queued.

``upgraded`` copies that database (a template copy: milliseconds) and migrates the copy with the
current code; it yields ``Upgraded``: the URL, the data dir (the same secrets key), and ``old``, a
description of what the previous version left there. Other suites extend the checks by asking for
``upgraded`` (``from test_upgrade import upgraded, old_database  # noqa: F401``) and looking at
what they care about.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from test_execution import ONE_RESOURCE, harness

from service import store
from service.api.app import create_app
from service.embedded import OWNER_ROLE, SERVICE_ROLE, EmbeddedPostgres, give_to_owner
from service.migrate import migrate, seal_plaintext
from service.secrets import KeyRing, load_or_create_key
from service.services import open_services
from service.settings import from_env

PREVIOUS = "e26d995"
ROOT = Path(__file__).resolve().parent.parent

# Runs under the previous version's code: makes its data, prints what it made as JSON.
OLD_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time

    import service
    assert service.__file__.startswith(sys.argv[3]), service.__file__  # the old code, not ours

    from service.auth import create_token, revoke_token
    from service.deploys import NewDeploy
    from service.migrate import migrate
    from service.services import open_services
    from service.settings import from_env
    from service.worker import Worker

    url, data_dir = sys.argv[1], sys.argv[2]
    ONE = sys.stdin.read()
    FAILS = 'resource "terraform_data" "bad" { provisioner "local-exec" { command = "echo failing; exit 3" } }'

    async def main():
        migrate(url)
        settings = from_env({}, data_dir=data_dir, runner="local", retry_delay=0.05, max_concurrency=2)
        services = await open_services(settings, url, pool_size=4)
        out = {"tokens": {}, "deploys": {}, "queued": []}
        async with services.pool.connection() as conn:
            out["tokens"]["alice"] = await create_token(conn, "alice")
            out["tokens"]["alice-ci"] = await create_token(conn, "alice")  # a second token
            out["tokens"]["bob"] = await create_token(conn, "bob")
            out["tokens"]["root"] = await create_token(conn, "root", admin=True)
            out["tokens"]["carl"] = await create_token(conn, "carl")
            await revoke_token(conn, "carl")
            # A name the old rules took and the new ones would not (it starts with "_").
            out["tokens"]["_svc"] = await create_token(conn, "_svc")

        async def request(owner, workspace, files, **kw):
            new = NewDeploy(workspace=workspace, action="apply", files=files,
                            max_attempts=kw.pop("max_attempts", 1), **kw)
            view, _ = await services.deploys.request(new, owner=owner, actor="user:" + owner)
            out["deploys"][view.id] = {"owner": owner, "workspace": workspace}
            return view.id

        worker = Worker(services, name="old-worker")
        task = asyncio.create_task(worker.run())
        # In order: prod is alice's first, then bob's too (one name, two users: contested).
        plan = [
            ("alice", "prod", ONE, {"variables": {"name": "alice-1"}}),
            ("bob", "prod", ONE, {"variables": {"name": "bob-1"}}),
            ("alice", "site", ONE, {"variables": {"name": "site-1"}}),
            ("bob", "api", ONE, {"variables": {"name": "api-1"}}),
            ("bob", "api", FAILS, {}),
            ("_svc", "tools", ONE, {"variables": {"name": "tools-1"}}),
        ]
        for owner, workspace, tf, kw in plan:
            deploy_id = await request(owner, workspace, {"main.tf": tf}, **kw)
            for _ in range(1200):
                view = await services.deploys.get(deploy_id)
                if view.status in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
            out["deploys"][deploy_id]["status"] = view.status
        worker.stop()
        await asyncio.wait_for(task, 60)
        await worker.close()
        # Queued when the upgrade comes: nobody runs them before it.
        out["queued"].append(await request(
            "alice", "site", {"main.tf": ONE}, variables={"name": "site-2"}, secrets={"token": "s3cr3t"}))
        out["queued"].append(await request("bob", "prod", {"main.tf": ONE}, variables={"name": "bob-2"}))
        async with services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT workspace, version, sha256, serial, lineage FROM state_versions ORDER BY 1, 2")
            out["states"] = [list(r) for r in await cur.fetchall()]
            cur = await conn.execute("SELECT count(*), max(position) FROM events")
            out["events"], out["last_position"] = await cur.fetchone()
            cur = await conn.execute("SELECT count(*) FROM deploy_logs")
            out["log_lines"] = (await cur.fetchone())[0]
        await services.close()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


class OldData(msgspec.Struct, kw_only=True):
    """What the previous version left in the database."""

    tokens: dict[str, str]  # alice, alice-ci, bob, root (admin), carl (revoked), _svc
    deploys: dict[str, dict[str, str]]  # id -> owner, workspace (a name), status
    queued: list[str]  # alice's to "site" (with a secret), bob's to the contested "prod"
    states: list[list[Any]]  # [workspace name, version, sha256, serial, lineage]
    events: int
    last_position: int
    log_lines: int

    def latest_state(self, name: str) -> list[Any]:
        return [s for s in self.states if s[0] == name][-1]


@dataclass
class Upgraded:
    url: str  # the service role's
    owner_url: str  # the schema owner's (migrations, DDL)
    data_dir: str
    old: OldData


def _admin(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.superuser_url(), autocommit=True)


@pytest.fixture(scope="module")
def old_database(
    pg_cluster: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, OldData]]:
    """(database name, data dir, what is in it): the previous version's database with its data."""
    where = tmp_path_factory.mktemp("previous")
    code, data_dir = where / "code", where / "data"
    code.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True, check=False
    )
    assert archive.returncode == 0, (
        f"git archive {PREVIOUS} failed (the upgrade test needs the repository's history): "
        f"{archive.stderr.decode()}"
    )
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    name = f"previous_{os.getpid()}"
    with _admin(pg_cluster) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TFDEPLOY_") and k != "PYTHONPATH"
    }
    env |= {"PYTHONPATH": str(code), "CHECKPOINT_DISABLE": "1"}
    made = subprocess.run(
        # The previous version connected as the cluster's superuser (its embedded default did).
        [sys.executable, "-c", OLD_SCRIPT, pg_cluster.superuser_url(name), str(data_dir), str(code)],
        input=ONE_RESOURCE,
        capture_output=True,
        text=True,
        cwd=code,
        env=env,
        timeout=600,
        check=False,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    old = msgspec.json.decode(made.stdout.strip().splitlines()[-1], type=OldData)
    try:
        yield name, str(data_dir), old
    finally:
        with _admin(pg_cluster) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def upgraded(pg_cluster: EmbeddedPostgres, old_database: tuple[str, str, OldData]) -> Upgraded:
    """A copy of the previous version's database, upgraded as the current code upgrades the
    embedded default: the database and its objects given to the owner role (what
    ``EmbeddedPostgres`` does to a cluster of the previous version), migrated as the owner, the
    plain-text states sealed (``tfdeploy migrate``'s data step). ``url`` is the service role's,
    ``owner_url`` the owner's."""
    name, data_dir, old = old_database
    copy = f"upgraded_{os.getpid()}_{os.urandom(3).hex()}"
    with _admin(pg_cluster) as conn:
        conn.execute(f"CREATE DATABASE {copy} TEMPLATE {name} OWNER {OWNER_ROLE}")
    with psycopg.connect(pg_cluster.superuser_url(copy), autocommit=True) as conn:
        give_to_owner(conn, OWNER_ROLE)
        conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {copy} TO {SERVICE_ROLE}")
    owner_url = pg_cluster.url_for(OWNER_ROLE, copy)
    applied = migrate(owner_url)
    assert "0007_tenants.sql" in applied
    settings = from_env({}, data_dir=data_dir)
    seal_plaintext(owner_url, KeyRing(load_or_create_key(settings)))
    return Upgraded(
        url=pg_cluster.url_for(SERVICE_ROLE, copy), owner_url=owner_url, data_dir=data_dir, old=old
    )


@pytest.fixture
async def app(upgraded: Upgraded) -> AsyncIterator[Any]:
    """The current API on the upgraded database: ``app.as_(user)`` is a client with the token
    the previous version gave ``user``."""
    services = await open_services(from_env({}, data_dir=upgraded.data_dir), upgraded.url, pool_size=4)
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://upgraded") as client:

        class App:
            def __init__(self) -> None:
                self.services = services

            async def get(self, user: str, path: str, **kw: Any) -> httpx.Response:
                return await client.get(path, headers={"Authorization": f"Bearer {upgraded.old.tokens[user]}"}, **kw)

        yield App()
    await services.close()


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


# ---------------------------------------------------------------- users and owners


def test_the_previous_version_left_what_we_meant(upgraded: Upgraded) -> None:
    """The data the checks below rely on (so none of them passes on an empty database)."""
    old = upgraded.old
    assert [(s[0], s[1]) for s in old.states] == [
        ("api", 1), ("prod", 1), ("prod", 2), ("site", 1), ("tools", 1)
    ]
    statuses = sorted(
        (v["owner"], v["workspace"], v.get("status", "queued")) for v in old.deploys.values()
    )
    assert statuses == [
        ("_svc", "tools", "succeeded"),
        ("alice", "prod", "succeeded"),
        ("alice", "site", "queued"),
        ("alice", "site", "succeeded"),
        ("bob", "api", "failed"),
        ("bob", "api", "succeeded"),
        ("bob", "prod", "queued"),
        ("bob", "prod", "succeeded"),
    ]
    assert old.log_lines > 10 and old.events > 20


def test_token_names_became_users_and_owners_are_kept(upgraded: Upgraded) -> None:
    old = upgraded.old
    users = rows(upgraded.url, "SELECT name, admin, disabled_at IS NULL FROM users ORDER BY name")
    assert users == [
        ("_svc", False, True),
        ("alice", False, True),
        ("bob", False, True),
        ("carl", False, True),
        ("root", True, True),
    ]
    tokens = rows(
        upgraded.url,
        "SELECT u.name, t.admin, t.revoked_at IS NOT NULL FROM api_tokens t"
        " JOIN users u ON u.id = t.user_id ORDER BY t.id",
    )
    assert tokens == [
        ("alice", False, False),
        ("alice", False, False),
        ("bob", False, False),
        ("root", True, False),
        ("carl", False, True),
        ("_svc", False, False),
    ]
    owners = dict(rows(upgraded.url, "SELECT id::text, owner FROM deploys"))
    assert owners == {d: v["owner"] for d, v in old.deploys.items()}
    # Events keep what they said; the upgrade only added the WorkspaceCreated of each name.
    counted = rows(
        upgraded.url,
        f"SELECT count(*) FILTER (WHERE position <= {old.last_position}),"
        f" count(*) FILTER (WHERE position > {old.last_position}) FROM events",
    )[0]
    assert counted == (old.events, 4)
    created = rows(
        upgraded.url,
        "SELECT data->>'name', data->>'owner', actor, stream_kind, version FROM events"
        f" WHERE position > {old.last_position} ORDER BY data->>'name'",
    )
    assert created == [
        ("api", "bob", "system:migration", "workspace", 1),
        ("prod", "alice", "system:migration", "workspace", 1),
        ("site", "alice", "system:migration", "workspace", 1),
        ("tools", "_svc", "system:migration", "workspace", 1),
    ]


def test_each_name_went_to_its_first_deployer_and_contested_ones_are_listed(
    upgraded: Upgraded,
) -> None:
    spaces = rows(upgraded.url, "SELECT name, owner FROM workspaces ORDER BY name")
    assert spaces == [("api", "bob"), ("prod", "alice"), ("site", "alice"), ("tools", "_svc")]
    # Every deploy points at the workspace its name became, whoever requested it.
    pointed = rows(
        upgraded.url,
        "SELECT d.workspace, d.workspace_owner, w.name, w.owner FROM deploys d"
        " JOIN workspaces w ON w.id = d.workspace_id",
    )
    assert len(pointed) == len(upgraded.old.deploys)
    assert all(name == ws and owner == ws_owner for name, owner, ws, ws_owner in pointed)
    contested = rows(
        upgraded.url,
        "SELECT owner, name, other_user, deploys, member_role FROM workspaces_contested",
    )
    assert contested == [("alice", "prod", "bob", 2, None)]  # bob's done one and his queued one
    env = {**os.environ, "TFDEPLOY_DATABASE_URL": upgraded.url, "TFDEPLOY_DATA_DIR": upgraded.data_dir}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "workspace", "contested"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("alice:prod"))
    assert line.split()[:3] == ["alice:prod", "bob", "2"]


def test_state_rows_moved_to_the_workspace_id(upgraded: Upgraded) -> None:
    keyed = rows(
        upgraded.url,
        "SELECT w.name, s.version, s.sha256, s.serial, s.lineage FROM state_versions s"
        " JOIN workspaces w ON w.id::text = s.workspace ORDER BY 1, 2",
    )
    assert [list(r) for r in keyed] == upgraded.old.states
    for table in ("state_versions", "state_blobs"):
        stray = rows(
            upgraded.url,
            f"SELECT count(*) FROM {table} WHERE workspace NOT IN (SELECT id::text FROM workspaces)",
        )
        assert stray == [(0,)], table
    locks = rows(
        upgraded.url,
        "SELECT j.lock, d.workspace_id::text FROM procrastinate_jobs j"
        " JOIN deploys d ON d.id = (j.args->>'deploy_id')::uuid WHERE j.status = 'todo'",
    )
    assert len(locks) == 2 and all(lock == f"workspace:{ws}" for lock, ws in locks)


async def test_migration_is_idempotent_and_rebuild_equals_live(upgraded: Upgraded) -> None:
    """The read model the migration wrote for old deploys is what a rebuild folds from their
    events (Requested without a workspace_id, resolved through the migrated mapping)."""
    assert migrate(upgraded.owner_url) == []
    before = rows(upgraded.url, "SELECT * FROM deploys ORDER BY id")
    assert all(r[-2] is not None for r in before)  # every deploy has its workspace
    async with await psycopg.AsyncConnection.connect(upgraded.owner_url) as conn, conn.transaction():
        await conn.execute("UPDATE deploys SET workspace_id = NULL, workspace_owner = ''")
        assert await store.rebuild_projections(conn) == len(upgraded.old.deploys)
    assert rows(upgraded.url, "SELECT * FROM deploys ORDER BY id") == before


# ---------------------------------------------------------------- through the current API


async def test_states_are_read_through_the_new_api_by_their_owner_only(
    upgraded: Upgraded, app: Any
) -> None:
    old = upgraded.old
    for name in ("prod", "site"):
        latest = old.latest_state(name)
        mine = await app.get("alice", f"/workspaces/{name}/state")
        assert mine.status_code == 200, mine.text
        assert mine.headers["etag"] == f'"{latest[2]}"'
        assert json.loads(mine.content)["serial"] == latest[3]
        assert (await app.get("alice-ci", f"/workspaces/alice:{name}/states")).status_code == 200
        # bob deployed to prod before the upgrade, but it is alice's now: nothing of it is his.
        assert (await app.get("bob", f"/workspaces/alice:{name}/state")).status_code == 404
        assert (await app.get("bob", f"/workspaces/{name}/state")).status_code == 404
        assert (await app.get("root", f"/workspaces/alice:{name}/state")).status_code == 200
    versions = (await app.get("alice", "/workspaces/prod/states")).json()["items"]
    assert [v["version"] for v in versions] == [2, 1]  # alice's and bob's applies, in order
    assert (await app.get("bob", "/workspaces/api/state")).status_code == 200
    assert (await app.get("carl", "/deploys")).status_code == 401  # revoked stays revoked
    # bob still sees the deploys he requested in prod (his own history) and their logs.
    bobs_prod = [d for d, v in old.deploys.items() if v["owner"] == "bob" and v["workspace"] == "prod"]
    for d in bobs_prod:
        assert (await app.get("bob", f"/deploys/{d}")).status_code == 200
        assert (await app.get("alice", f"/deploys/{d}")).status_code == 200  # her workspace's
    failed = next(d for d, v in old.deploys.items() if v.get("status") == "failed")
    logs = await app.get("bob", f"/deploys/{failed}/logs")
    assert logs.status_code == 200 and "failing" in logs.text
    # A user whose name the new rules would not take still reads theirs; others name it.
    assert (await app.get("_svc", "/workspaces/tools/state")).status_code == 200
    assert (await app.get("root", "/workspaces/_svc:tools/outputs")).status_code == 200
    assert (await app.get("alice", "/workspaces/_svc:tools/state")).status_code == 404
    listed = {w["ref"]: w for w in (await app.get("alice", "/workspaces")).json()["items"]}
    assert sorted(listed) == ["alice:prod", "alice:site"]
    assert listed["alice:prod"]["latest_state"]["version"] == 2


async def test_the_queued_deploys_still_run_after_the_upgrade(
    upgraded: Upgraded, tmp_path: Path, runner_image: str
) -> None:
    old = upgraded.old
    async with harness(
        upgraded.url, tmp_path, "local", runner_image, data_dir=upgraded.data_dir
    ) as h:
        done = []
        for deploy_id in old.queued:
            for _ in range(2400):
                view = await h.services.deploys.get(deploy_id)
                assert view is not None
                if view.status in ("succeeded", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
            done.append(msgspec.to_builtins(view))
        assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
        async with h.services.pool.connection() as conn:
            site_state = await store.read_stream(conn, old.queued[0])
        persisted = [e for e in site_state if e.type == "StatePersisted"]
        # It started from site's state: the next version of the same lineage.
        site = old.latest_state("site")
        assert persisted[0].data["state_version"] == site[1] + 1
        assert persisted[0].data["workspace"] == done[0]["workspace_id"]
        versions = rows(
            upgraded.url,
            "SELECT w.name, s.version, s.lineage FROM state_versions s"
            " JOIN workspaces w ON w.id::text = s.workspace ORDER BY s.created_at",
        )
        assert versions[-2:] in (
            [("site", site[1] + 1, site[4]), ("prod", 3, old.latest_state("prod")[4])],
            [("prod", 3, old.latest_state("prod")[4]), ("site", site[1] + 1, site[4])],
        )
        # bob's queued deploy to "prod" ran where "prod" was when he asked: alice's workspace.
        assert (done[1]["owner"], done[1]["workspace_owner"]) == ("bob", "alice")
