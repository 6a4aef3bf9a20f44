"""Packaging: the locks are complete and say what the service imports; the image builds with no
network (scripts/build-image.sh), serves from the image, and hands deploys to a worker outside."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

# Run by a Python that sees only what a lock installed: every import in service/ (module level or
# inside a function) must resolve, and every module must import. argv[1]: packages allowed to be
# missing (the image leaves out the embedded PostgreSQL).
CHECK_IMPORTS = r"""
import ast, importlib, importlib.util, pkgutil, sys
from pathlib import Path
import service
allowed = set(filter(None, sys.argv[1].split(",")))
root = Path(service.__file__).parent
names = set()
for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
missing = sorted(
    n for n in names - set(sys.stdlib_module_names) - {"service"} - allowed
    if importlib.util.find_spec(n) is None
)
broken = []
for m in pkgutil.walk_packages(service.__path__, "service."):
    try:
        importlib.import_module(m.name)
    except Exception as exc:
        broken.append(f"{m.name}: {exc!r}")
print(f"{len(names)} imported packages; missing: {missing}; broken: {broken}")
sys.exit(1 if missing or broken else 0)
"""


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


# ---------------------------------------------------------------- the locks


def test_locks_pin_every_declared_dependency_once():
    """A dependency added to pyproject.toml without `scripts/lock` fails here, as does a pin the
    declared range no longer admits."""
    runtime = lock_pins(ROOT / "requirements.lock")
    test = lock_pins(ROOT / "requirements-test.lock")
    assert not set(runtime) & set(test)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [(r, runtime) for r in project["dependencies"]]
    declared += [(r, {**runtime, **test}) for r in project["optional-dependencies"]["test"]]
    for text, pins in declared:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is declared but not locked: run scripts/lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req.specifier}"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in [*build, "pip", "wheel"]:
        req = Requirement(text)
        assert req.name in runtime and req.specifier.contains(runtime[req.name]), text


def test_faker_and_friends_stay_out_of_the_runtime_lock():
    runtime = lock_pins(ROOT / "requirements.lock")
    for name in ("faker", "polyfactory", "rich", "rich-click", "pygments", "httpx"):
        assert name not in runtime, name


def test_every_service_import_resolves_in_a_venv_of_the_runtime_lock(tmp_path):
    """A venv made from requirements.lock alone, as scripts/up makes it, imports all of service/."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--disable-pip-version-check", "--no-deps", "-r", str(ROOT / "requirements.lock")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # service/ from the checkout (cwd), everything else from the venv alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CHECK_IMPORTS, ""],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "missing: []; broken: []" in proc.stdout


# ---------------------------------------------------------------- compose and the Dockerfile


COMPOSE_SECRETS = {
    "TFDEPLOY_SECRETS_KEY": "k" * 44,
    "TFDEPLOY_PG_SUPERUSER_PASSWORD": "pw-superuser-given",
    "TFDEPLOY_PG_OWNER_PASSWORD": "pw-owner-given",
    "TFDEPLOY_PG_SERVICE_PASSWORD": "pw-service-given",
    "TFDEPLOY_S3_SECRET": "pw-s3-given",
}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True, text=True, env={**clean, **env}, cwd=ROOT, timeout=60,
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_has_no_default_password_and_gives_the_owners_to_migrate_only():
    for name in COMPOSE_SECRETS:  # each one is required: no fixed default to fall back on
        proc = compose_config({k: v for k, v in COMPOSE_SECRETS.items() if k != name})
        assert proc.returncode != 0 and name in proc.stderr, (name, proc.stderr)
    import yaml

    config = yaml.safe_load(compose_config(COMPOSE_SECRETS).stdout)["services"]
    for name in ("api", "worker", "migrate"):
        url = config[name]["environment"]["TFDEPLOY_DATABASE_URL"]
        assert url.startswith("postgresql://tfdeploy_service:pw-service-given@"), name
    assert config["migrate"]["environment"]["TFDEPLOY_MIGRATE_DATABASE_URL"].startswith(
        "postgresql://tfdeploy_owner:pw-owner-given@")
    for name in ("api", "worker"):  # the owner's password stays with the one-shot migrate
        assert "pw-owner-given" not in str(config[name]), name
    assert "pw-superuser-given" not in str({k: v for k, v in config.items() if k != "postgres"})


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_config_is_valid():
    proc = compose_config(COMPOSE_SECRETS)
    assert proc.returncode == 0, proc.stderr
    for service in ("postgres:", "objectstore:", "api:", "worker:"):
        assert service in proc.stdout
    # Only the worker gets the Docker socket.
    config = proc.stdout
    assert config.count("/var/run/docker.sock") == 2  # source and target of the worker's one mount


def test_dockerfile_installs_offline_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text
    assert "PIP_NO_INDEX=1" in text and "COPY wheels /wheels" in text
    final = text.rsplit("\nFROM ", 1)[1]
    assert "wheels" not in final  # the wheelhouse stays in the build stages
    assert "USER tfdeploy" in final
    assert "--network none" in (ROOT / "scripts" / "build-image.sh").read_text()


# ---------------------------------------------------------------- the image, built and run


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def service_image() -> str:
    """The image, built by scripts/build-image.sh under a tag of this checkout's own (several
    checkouts may share one engine)."""
    if not _docker_ok():
        pytest.skip("no Docker engine answers: the image cannot be built")
    tag = f"tfdeploy-test:{hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]}"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), tag],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == tag  # the image's name comes last
    # The tag stays: it holds the build's cached layers for the next run.
    return tag


def _run_image(image: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "host", *flags, image, *args],
        capture_output=True, text=True, timeout=timeout,
    )


def _http(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.docker
def test_image_holds_what_the_service_imports(service_image):
    proc = subprocess.run(
        ["docker", "run", "--rm", "-i", "--network", "none", "--entrypoint", "python3",
         service_image, "-", "pgserver"],
        input=CHECK_IMPORTS, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # boto3 builds an S3 client and signs a request from the models the image keeps.
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", service_image, "-c",
         "import boto3; c = boto3.client('s3', region_name='eu-west-1', aws_access_key_id='a', "
         "aws_secret_access_key='b'); print(c.generate_presigned_url('get_object', "
         "Params={'Bucket': 'tfstate', 'Key': 'k'}))"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("https://tfstate.s3.") and "Signature=" in proc.stdout, proc.stdout


@pytest.mark.docker
def test_image_serves_and_a_worker_outside_runs_the_deploy(
    service_image, database_url, owner_database_url, tmp_path
):
    """`serve` from the image (host network) against the tests' PostgreSQL; a deploy posted to
    it runs in a worker of this venv (local runner) to `succeeded`, with a secret the API
    sealed and the worker opened under one shared key."""
    from service.secrets import generate_key

    key = generate_key()
    db = {"TFDEPLOY_DATABASE_URL": database_url, "TFDEPLOY_SECRETS_KEY": key}
    # The image migrates as the schema's owner (TFDEPLOY_MIGRATE_DATABASE_URL), serves as the
    # service role.
    migrated = _run_image(
        service_image, "migrate", env={**db, "TFDEPLOY_MIGRATE_DATABASE_URL": owner_database_url}
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]  # the image finds its migrations
    made = _run_image(service_image, "token", "create", "--name", "pkg", "--admin", env=db)
    assert made.returncode == 0, made.stderr[-3000:]
    token = made.stdout.strip().splitlines()[-1]

    port = _free_port()
    name = f"tfdeploy-pkg-{uuid.uuid4().hex[:12]}"
    env = {**db, "TFDEPLOY_HOST": "127.0.0.1", "TFDEPLOY_PORT": str(port), "TFDEPLOY_LOG_LEVEL": "warning"}
    flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", "host", *flags, service_image, "serve"],
        check=True, capture_output=True, timeout=60,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env={**os.environ, **db, "TFDEPLOY_RUNNER": "local", "TFDEPLOY_DATA_DIR": str(tmp_path),
             "TFDEPLOY_LOG_LEVEL": "warning"},
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _http("GET", f"{base}/health")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, _container_logs(name)
            time.sleep(0.2)
        assert json.loads(body)["database"] == "ok"

        files = {"main.tf": (
            'variable "word" {\n  type = string\n  sensitive = true\n}\n'
            'resource "terraform_data" "x" {\n  input = sensitive(var.word)\n'
            '  provisioner "local-exec" { command = "echo from-the-image" }\n}\n'
        )}
        status, body = _http("POST", f"{base}/deploys", token,
                             {"workspace": "packaged", "files": files, "secrets": {"word": "sealed-and-opened"}})
        assert status == 202, body
        deploy = json.loads(body)
        deadline = time.monotonic() + 90
        while True:
            status, body = _http("GET", f"{base}/deploys/{deploy['id']}", token)
            current = json.loads(body)
            if current["status"] in ("succeeded", "failed"):
                break
            assert worker.poll() is None, worker.communicate()[1][-3000:]
            assert time.monotonic() < deadline, current
            time.sleep(0.25)
        assert current["status"] == "succeeded", current
        status, body = _http("GET", f"{base}/deploys/{deploy['id']}/logs", token)
        assert status == 200 and b"from-the-image" in body
        status, body = _http("GET", f"{base}/workspaces/packaged/state", token)
        assert status == 200
        (resource,) = json.loads(body)["resources"]
        assert resource["instances"][0]["attributes"]["input"]["value"] == "sealed-and-opened"
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
        logs = _container_logs(name)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    assert "Traceback" not in logs, logs


def _container_logs(name: str) -> str:
    proc = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=30)
    return (proc.stdout + proc.stderr)[-4000:]
