"""Packaging: compose.yaml is valid for docker-compose, the Dockerfile is multi-stage."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_config_is_valid():
    env = {**os.environ, "TFDEPLOY_SECRETS_KEY": "x" * 44}
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )
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
