"""Packaging: compose.yaml is valid for docker-compose, the Dockerfile is multi-stage."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


def test_dockerfile_is_multi_stage_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2
    assert "COPY --from=build /venv /venv" in text
    assert "USER tfdeploy" in text
