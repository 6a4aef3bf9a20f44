"""The ``tfdeploy`` command line, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent


def tfdeploy(*args: str, env: dict[str, str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tfdeploy {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tfdeploy up exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if http("GET", f"{base}/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("tfdeploy up did not become healthy")


def test_bad_setting_stops_with_the_variable_named(tmp_path):
    proc = tfdeploy("migrate", env={"TFDEPLOY_MAX_CONCURRENCY": "many", "TFDEPLOY_DATA_DIR": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert "TFDEPLOY_MAX_CONCURRENCY" in proc.stderr


def test_up_embedded_serves_deploys_stops_cleanly_and_reuses_data(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "TFDEPLOY_DATA_DIR": str(tmp_path / "data"),
        "TFDEPLOY_RUNNER": "local",
        "TFDEPLOY_PORT": str(port),
        "TFDEPLOY_LOG_LEVEL": "warning",
    }
    env.pop("TFDEPLOY_DATABASE_URL", None)
    base = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    proc = start()
    try:
        wait_healthy(base, proc)
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        assert oct((tmp_path / "data" / "admin.token").stat().st_mode & 0o777) == "0o600"
        files = {"main.tf": 'resource "terraform_data" "x" {\n  provisioner "local-exec" { command = "echo up-works" }\n}\n'}
        status, d = http("POST", f"{base}/deploys", token, {"files": files, "workspace": "cli"})
        assert status == 202
        deadline = time.monotonic() + 60
        while http("GET", f"{base}/deploys/{d['id']}", token)[1]["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    pgdata = tmp_path / "data" / "postgres" / "pgdata"
    assert not (pgdata / "postmaster.pid").exists(), err[-3000:]  # PostgreSQL stopped with it

    proc = start()
    try:
        wait_healthy(base, proc)
        status, again = http("GET", f"{base}/deploys/{d['id']}", token)
        assert status == 200 and again["status"] == "succeeded"  # same data, same token
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def test_tokens_migrate_rebuild_replay_and_events(database_url, owner_database_url, tmp_path):
    env = {
        "TFDEPLOY_DATABASE_URL": database_url,
        "TFDEPLOY_MIGRATE_DATABASE_URL": owner_database_url,
        "TFDEPLOY_DATA_DIR": str(tmp_path),
    }
    assert "up to date" in tfdeploy("migrate", env=env).stdout

    token = tfdeploy("token", "create", "--name", "ops", "--admin", env=env).stdout.strip()
    assert token.startswith("tfd_")
    listing = tfdeploy("token", "list", env=env).stdout
    assert "ops" in listing and "admin" in listing and token not in listing
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT token_hash FROM api_tokens").fetchall()
    assert token not in repr(stored)  # only the hash is kept

    # A failed deploy, made in-process through the command handler.
    import asyncio

    from service.lifecycle import AttemptFailed, StartAttempt
    from service.services import open_services
    from service.settings import from_env

    async def make_failed() -> str:
        services = await open_services(from_env({}, data_dir=str(tmp_path)), database_url)
        try:
            from service.deploys import NewDeploy

            view, _ = await services.deploys.request(
                NewDeploy(workspace="w", action="apply", files={"main.tf": ""}, max_attempts=1),
                owner="ann", actor="user:ann",
            )
            await services.deploys.execute(view.id, StartAttempt(), "worker:t")
            await services.deploys.execute(view.id, AttemptFailed(reason="apply_failed"), "worker:t")
            return view.id
        finally:
            await services.close()

    deploy_id = asyncio.run(make_failed())
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT * FROM deploys ORDER BY id").fetchall()
    assert "rebuilt 1 deploy" in tfdeploy("projections", "rebuild", env=env).stdout
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT * FROM deploys ORDER BY id").fetchall() == before

    out = tfdeploy("replay", "--failed", "--since", "1h", "--actor", "root", env=env).stdout
    assert deploy_id in out and "retrying" in out
    again = tfdeploy("replay", deploy_id, env=env, check=False)
    assert again.returncode == 1 and "cannot replay" in again.stderr

    events = tfdeploy("events", "--deploy", deploy_id, env=env).stdout.splitlines()
    assert [line.split()[5] for line in events] == ["Requested", "Started", "Failed", "Retried"]
    assert "admin:root" in events[-1]

    ops = next(line.split()[0] for line in listing.splitlines() if " ops " in line)
    assert tfdeploy("token", "revoke", "ops", env=env, check=False).returncode == 2  # ids only
    assert f"revoked token {ops}" in tfdeploy("token", "revoke", ops, env=env).stdout
    assert "revoked" in tfdeploy("token", "list", env=env).stdout
    assert tfdeploy("token", "revoke", ops, env=env, check=False).returncode == 1


def test_users_tokens_expiry_and_events_escaped(database_url, tmp_path):
    """user create/list/disable, token create --user/--expires/--label, token list's columns,
    and control characters in events shown as escapes, never sent to the terminal."""
    import asyncio

    env = {"TFDEPLOY_DATABASE_URL": database_url, "TFDEPLOY_DATA_DIR": str(tmp_path)}
    assert "created" in tfdeploy("user", "create", "dana", env=env).stdout
    again = tfdeploy("user", "create", "dana", env=env, check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = tfdeploy("user", "create", "-dash", env=env, check=False)
    assert bad.returncode != 0
    assert tfdeploy("user", "create", "boss", "--admin", env=env).returncode == 0
    users = tfdeploy("user", "list", env=env).stdout
    assert any(line.split()[:2] == ["boss", "admin"] for line in users.splitlines())
    assert any(line.split()[:2] == ["dana", "user"] for line in users.splitlines())

    token = tfdeploy("token", "create", "--user", "dana", "--expires", "30d", "--label", "ci", env=env).stdout.strip()
    assert token.startswith("tfd_")
    short = tfdeploy("token", "create", "--user", "dana", "--expires", "1s", env=env).stdout.strip()
    unknown = tfdeploy("token", "create", "--user", "nobody", env=env, check=False)
    assert unknown.returncode == 1 and "no user" in unknown.stderr
    # --name makes the user if needed; --admin for an existing non-admin is refused.
    assert tfdeploy("token", "create", "--name", "erin", env=env).stdout.startswith("tfd_")
    promote = tfdeploy("token", "create", "--name", "dana", "--admin", env=env, check=False)
    assert promote.returncode == 1 and "not an admin" in promote.stderr

    from service.auth import authenticate

    async def who(t: str) -> str | None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            p = await authenticate(conn, t)
            return p.name if p else None

    import time

    time.sleep(1.1)  # the 1 s token expires
    assert asyncio.run(who(token)) == "dana" and asyncio.run(who(short)) is None
    listing = tfdeploy("token", "list", env=env).stdout.splitlines()
    assert listing[0].split()[:4] == ["id", "user", "label", "role"] and "last used" in listing[0]
    ci = next(line for line in listing if " ci " in line)
    assert "dana" in ci and "active" in ci and ci.count("-") >= 4  # created, expires, last used
    assert any("dana" in line and "expired" in line for line in listing)

    assert "disabled" in tfdeploy("user", "disable", "dana", env=env).stdout
    assert asyncio.run(who(token)) is None  # refused from the next request on
    assert any("dana" in line and "user disabled" in line for line in tfdeploy("token", "list", env=env).stdout.splitlines())
    assert tfdeploy("user", "disable", "dana", env=env, check=False).returncode == 1

    # A variable value with an ANSI escape and a carriage return: printed as escapes.
    from service.deploys import NewDeploy
    from service.lifecycle import AttemptFailed, StartAttempt
    from service.services import open_services
    from service.settings import from_env

    async def hostile() -> str:
        services = await open_services(from_env({}, data_dir=str(tmp_path)), database_url)
        try:
            view, _ = await services.deploys.request(
                NewDeploy(
                    workspace="w",
                    action="apply",
                    files={"main.tf": ""},
                    variables={"v": "\x1b[2J\x1b]0;pwned\x07\rfake"},
                    max_attempts=1,
                ),
                owner="erin",
                actor="user:erin",
            )
            # terraform's error text goes into Failed.message as it came: it may carry them too.
            await services.deploys.execute(view.id, StartAttempt(), "worker:t")
            await services.deploys.execute(
                view.id,
                AttemptFailed(reason="apply_failed", message="\x1b[31mError\x1b[0m\rok"),
                "worker:t",
            )
            return view.id
        finally:
            await services.close()

    deploy_id = asyncio.run(hostile())
    out = tfdeploy("events", "--deploy", deploy_id, env=env).stdout
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\x1b[31mError" in out and "\\rok" in out


@pytest.mark.parametrize("bad", ["", "1x", "h"])
def test_replay_since_is_validated(bad, tmp_path):
    proc = tfdeploy("replay", "--failed", "--since", bad, env={"TFDEPLOY_DATA_DIR": str(tmp_path)}, check=False)
    assert proc.returncode == 2
