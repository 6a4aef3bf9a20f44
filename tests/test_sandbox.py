"""The local runner's sandbox, tested as an attacker would use it: a configuration is hostile
code. Real terraform in a real bubblewrap sandbox; the probes run as local-exec provisioners.

What the sandbox must keep out of reach (CONTRACT, "Runners and their isolation"): the data
dir (keys, tokens, run records), the service's environment, the database's socket and (with
network ``none``) its TCP port, the service's own files, other processes (other runs
included) and other runs' temporary directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_runners import WEB, make_settings, run_tf

from service.runners import RunnerError, sandbox
from service.runners.local import LocalRunner

pytestmark = pytest.mark.skipif(
    not shutil.which("terraform") or not shutil.which("bwrap"), reason="needs terraform and bwrap"
)

ROOT = Path(__file__).resolve().parent.parent

# The attacker's probes, in Python (the host's /usr is visible read-only, so is python3). Each
# prints one "PROBE name: what it found" line.
PROBES = r'''
import glob, os, socket, sys
data_dir, port, sock_dir, other_tmp, service_dir = sys.argv[1:6]
def probe(name, fn):
    try:
        found = fn()
    except Exception as exc:
        found = "refused: " + type(exc).__name__
    print("PROBE " + name + ": " + str(found), flush=True)
probe("data dir listing", lambda: sorted(os.listdir(data_dir)))
probe("secrets key", lambda: open(os.path.join(data_dir, "secrets.key")).read())
probe("run records", lambda: sorted(os.listdir(os.path.join(data_dir, "local-runs"))))
def environ():
    hits = []
    for path in glob.glob("/proc/*/environ"):
        try:
            if b"TFDEPLOY_" in open(path, "rb").read():
                hits.append(path)
        except OSError:
            pass
    return hits
probe("TFDEPLOY_ in /proc/*/environ", environ)
probe("own env TFDEPLOY_", lambda: sorted(k for k in os.environ if k.startswith("TFDEPLOY")))
probe("processes", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
def unix_socket():
    hits = glob.glob(os.path.join(sock_dir, ".s.PGSQL.*"))
    for path in hits:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        return "connected to " + path
    return "no socket"
probe("database socket", unix_socket)
def tcp():
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=3)
    s.close()
    return "connected"
probe("database tcp", tcp)
probe("other run dirs", lambda: glob.glob(os.path.join(other_tmp, "tfdeploy-run-*")))
probe("service files", lambda: sorted(os.listdir(service_dir))[:3])
probe("shadow", lambda: open("/etc/shadow").read()[:10])
'''


def attacker_config(args: list[str]) -> dict[str, str]:
    quoted = " ".join(f"'{a}'" for a in args)
    return {
        "probe.py": PROBES,
        "main.tf": f"""
resource "terraform_data" "probe" {{
  provisioner "local-exec" {{
    command = "python3 probe.py {quoted}"
  }}
}}
""",
    }


def probes(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if "PROBE " in line:
            name, _, what = line.split("PROBE ", 1)[1].partition(": ")
            found[name] = what
    return found


class Listener:
    """A TCP listener on 127.0.0.1 and a unix socket named like PostgreSQL's, standing for the
    database (the attack must reach neither)."""

    def __init__(self, sock_dir: Path) -> None:
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.port = self.tcp.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX)
        self.path = sock_dir / f".s.PGSQL.{self.port}"
        self.unix.bind(str(self.path))
        self.unix.listen(8)
        os.chmod(self.path, 0o777)

    def close(self) -> None:
        self.tcp.close()
        self.unix.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def data_outside_tmp():
    """A data dir outside /tmp (which the sandbox replaces anyway): in the home directory."""
    import tempfile

    parent = Path.home() / ".cache"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="tfdeploy-sandbox-test-", dir=parent))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_hostile_configuration_reaches_nothing_of_the_service(data_outside_tmp, monkeypatch):
    data = data_outside_tmp
    (data / "secrets.key").write_text("the-service-key\n")
    (data / "local-runs").mkdir()
    (data / "local-runs" / "someone-else-a1-r1.json").write_text("{}")
    monkeypatch.setenv("TFDEPLOY_SECRETS_KEY", "service-own-secret")
    monkeypatch.setenv("TFDEPLOY_DATABASE_URL", "postgresql://tfdeploy:pw@127.0.0.1/tfdeploy")
    listener = Listener(Path("/tmp"))
    # Another run's temp dir, as the local runner makes them.
    other = Path(__import__("tempfile").mkdtemp(prefix="tfdeploy-run-"))
    (other / "terraform.tfstate").write_text('{"secret": "other-run"}')
    try:
        settings = make_settings(data, runner_network="none")
        runner = LocalRunner(settings)
        assert runner.sandboxed
        args = [str(data), str(listener.port), "/tmp", str(other.parent), str(ROOT / "service")]
        run = await run_tf(runner, attacker_config(args))
        assert run.result.exit_code == 0, run.text
        found = probes(run.text)
        print("\n" + "\n".join(f"{k}: {v}" for k, v in found.items()))
        assert len(found) == 11, run.text
        assert found["data dir listing"].startswith("refused")
        assert found["secrets key"].startswith("refused")
        assert found["run records"].startswith("refused")
        assert found["TFDEPLOY_ in /proc/*/environ"] == "[]"
        assert found["own env TFDEPLOY_"] == "[]"
        # Its own pid namespace: the script (pid 1), terraform, the provisioner's shell, python.
        assert all(int(p) < 50 for p in json.loads(found["processes"])), found["processes"]
        assert found["database socket"] == "no socket"
        assert found["database tcp"].startswith("refused")
        assert found["other run dirs"] == "[]"
        assert found["service files"].startswith("refused")
        assert found["shadow"].startswith("refused")
        assert "the-service-key" not in run.text and "service-own-secret" not in run.text
        assert "other-run" not in run.text
    finally:
        listener.close()
        shutil.rmtree(other, ignore_errors=True)


async def test_with_network_the_sandbox_still_hides_the_socket_but_reaches_tcp(tmp_path):
    """Without TFDEPLOY_RUNNER_NETWORK=none the run shares the host's network (providers need
    it): the database's TCP port answers, so it must be protected by its password
    (docs/security.md); its socket directory stays out of reach."""
    listener = Listener(Path("/tmp"))
    try:
        runner = LocalRunner(make_settings(tmp_path / "data", runner_network=None))
        args = [str(tmp_path), str(listener.port), "/tmp", "/tmp", str(ROOT)]
        run = await run_tf(runner, attacker_config(args))
        found = probes(run.text)
        assert found["database socket"] == "no socket"
        assert found["database tcp"] == "connected"
    finally:
        listener.close()


async def test_the_sandboxed_run_cannot_release_its_place_under_the_cap(tmp_path):
    """The place's lock is held by a holder process outside the sandbox: nothing in the sandbox
    has its descriptor (flock's unlock acts on every holder of a description), so a hostile
    configuration cannot free its place for others while it runs."""
    settings = make_settings(tmp_path, max_concurrency=1)
    runner = LocalRunner(settings)
    config = """
resource "terraform_data" "t" {
  provisioner "local-exec" {
    command = "ls -l /proc/self/fd /proc/1/fd 2>&1 | grep -c slot- ; for fd in 0 3 4 5 6 7 8 9; do busybox flock -u $fd 2>/dev/null; done; echo unlock-tried; sleep 2"
  }
}
"""
    seen: list[int] = []

    async def on_line(stream, line):
        if line.endswith("unlock-tried"):
            await asyncio.sleep(0.5)
            seen.append(await runner.running())

    run = await run_tf(runner, config, on_line=on_line)
    assert run.result.exit_code == 0, run.text
    assert "(local-exec): 0" in run.text  # no descriptor of a slot lock inside
    assert seen == [1]


async def test_the_run_outlives_its_worker_and_keeps_its_place(tmp_path):
    """A worker killed mid-run: terraform goes on in its sandbox (no --die-with-parent), its
    place stays held (the holder process has the lock), and another worker's recovery
    interrupts it gracefully, reads its state, and the place frees when it ends."""
    data = tmp_path / "data"
    script = tmp_path / "worker.py"
    script.write_text(f"""
import asyncio, sys
sys.path.insert(0, {str(ROOT)!r})
from service.settings import from_env
from service.runners import RunRequest, steps_for
from service.runners.local import LocalRunner

CONFIG = '''
resource "terraform_data" "a" {{
  provisioner "local-exec" {{ command = "echo MADE-A" }}
}}
resource "terraform_data" "b" {{
  depends_on = [terraform_data.a]
  provisioner "local-exec" {{ command = "echo B-STARTS; sleep 60" }}
}}
'''

async def main():
    runner = LocalRunner(from_env({{}}, data_dir={str(data)!r}, max_concurrency=1))
    slot = await runner.acquire_slot(RunRequest(
        deploy_id="orphan", attempt=1, workspace="w", steps=steps_for("apply"),
        files={{"main.tf": CONFIG}}))
    async def on_line(stream, line):
        print(line, flush=True)
    await runner.run(slot, on_line, asyncio.Event())

asyncio.run(main())
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "B-STARTS" in line:
                break
        proc.kill()
        proc.wait(10)
        (record_path,) = (data / "local-runs").glob("orphan-a1-r*.json")
        record = json.loads(record_path.read_text())
        assert record["sandboxed"] and record["pgid"] != record["sandbox_pid"]
        from service.runners.local_orphans import find_sandbox_pid

        assert find_sandbox_pid(record["pgid"]) == record["sandbox_pid"]  # the fallback agrees
        runner = LocalRunner(make_settings(data, max_concurrency=1), grace=10)
        assert await runner.running() == 1  # terraform still runs and holds the place
        result = await runner.collect_orphan("orphan", 1)
        assert result is not None
        assert result.exit_code != 0 and result.failed_step == "apply"  # from its status file
        assert result.state is not None
        names = {r["name"] for r in json.loads(result.state)["resources"]}
        assert "a" in names  # the state terraform wrote when interrupted
        assert await runner.running() == 0  # ended: the place is free
        await runner.discard_orphan("orphan", 1)
        assert list((data / "local-runs").glob("*.json")) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_hidden_paths_under_a_bound_root_are_covered():
    """Paths that must stay hidden but lie under /usr or /etc (a data dir in /etc, the service
    installed under /usr) get an empty tmpfs over them; others are simply not bound."""
    args = sandbox.command(
        bwrap="bwrap", run_dir="/tmp/x", terraform="/usr/local/bin/terraform", script="true",
        info_fd=9, network_none=True, mounts={"/tfdeploy/providers/mirror": "/srv/mirror"},
        hidden=["/etc", "/home/nobody-there", "/usr/lib/python3/dist-packages"],
    )
    pairs = list(zip(args, args[1:], strict=False))
    assert ("--tmpfs", "/etc") in pairs
    assert ("--tmpfs", "/usr/lib/python3/dist-packages") in pairs
    assert ("--tmpfs", "/home/nobody-there") not in pairs
    assert "--unshare-net" in args and "--unshare-pid" in args and "--die-with-parent" not in args
    i = args.index("/tfdeploy/providers/mirror")
    assert args[i - 2 : i] == ["--ro-bind", "/srv/mirror"]  # provider mounts are read-only


def test_without_a_working_sandbox_the_local_runner_refuses_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(RunnerError, match="bubblewrap"):
        LocalRunner(make_settings(tmp_path))
    runner = LocalRunner(make_settings(tmp_path, local_unsandboxed=True))
    assert not runner.sandboxed


async def test_an_unsandboxed_run_says_so_in_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    runner = LocalRunner(make_settings(tmp_path, local_unsandboxed=True))
    run = await run_tf(runner, WEB)
    assert run.result.exit_code == 0, run.text
    assert any(s == "system" and "NOT sandboxed" in line for s, line in run.lines)
