"""Settings: one msgspec Struct read from the ``TFDEPLOY_*`` environment, validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

PREFIX = "TFDEPLOY_"


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    data_dir: str = "./.tfdeploy"
    # None means "decide at start": docker when an engine answers, else local.
    runner: Literal["docker", "local"] | None = None
    runner_image: str = "hashicorp/terraform:1.11"
    runner_network: str | None = None
    runner_memory: str = "512m"
    runner_cpus: float = 1.0
    runner_pids: int = 256
    max_concurrency: int = 4
    max_attempts: int = 3
    retry_delay: float = 10.0
    deploy_timeout: float = 3600.0
    # After SIGTERM, how long a worker lets running deploys finish before it interrupts them
    # (state kept) and hands them over. None: the deploy timeout, i.e. they finish.
    shutdown_grace: float | None = None
    state_store: Literal["postgres", "s3"] = "postgres"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_prefix: str = "tfdeploy"
    secrets_key: str | None = None
    max_request_bytes: int = 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("MAX_CONCURRENCY", self.max_concurrency >= 1, "must be at least 1"),
            ("MAX_ATTEMPTS", self.max_attempts >= 1, "must be at least 1"),
            ("RETRY_DELAY", self.retry_delay >= 0, "must not be negative"),
            ("DEPLOY_TIMEOUT", self.deploy_timeout > 0, "must be positive"),
            (
                "SHUTDOWN_GRACE",
                self.shutdown_grace is None or self.shutdown_grace >= 0,
                "must not be negative",
            ),
            ("RUNNER_CPUS", self.runner_cpus > 0, "must be positive"),
            ("RUNNER_PIDS", self.runner_pids >= 16, "must be at least 16"),
            ("MAX_REQUEST_BYTES", self.max_request_bytes >= 1024, "must be at least 1024"),
            ("PORT", 0 <= self.port <= 65535, "must be a TCP port"),
            (
                "S3_BUCKET",
                self.state_store != "s3" or bool(self.s3_bucket),
                "is required when TFDEPLOY_STATE_STORE=s3",
            ),
            (
                "DATABASE_URL",
                self.database_url is None
                or self.database_url.startswith(("postgresql://", "postgres://")),
                "must be a postgresql:// URL",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SettingsError(f"{PREFIX}{name} {why}")

    @property
    def shutdown_grace_in_effect(self) -> float:
        """The shutdown grace in effect (``TFDEPLOY_SHUTDOWN_GRACE``, else the deploy timeout)."""
        return self.deploy_timeout if self.shutdown_grace is None else self.shutdown_grace

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}


def from_env(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Read settings from the environment; a bad value raises SettingsError naming it."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for name in _FIELDS:
        text = env.get(PREFIX + name.upper())
        if text is not None and text != "":
            raw[name] = text
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for name, given in raw.items():
        value = given
        # One field at a time so the error names the variable, not a JSON path.
        try:
            msgspec.convert({name: value}, type=_single(name), strict=False)
        except msgspec.ValidationError as exc:
            detail = str(exc).split(" - at ")[0]
            raise SettingsError(f"{PREFIX}{name.upper()}={value!r}: {detail}") from None
    try:
        return msgspec.convert(raw, type=Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(str(exc)) from None


_single_cache: dict[str, type] = {}


def _single(name: str) -> type:
    if name not in _single_cache:
        field = _FIELDS[name]
        _single_cache[name] = msgspec.defstruct(f"_{name}", [(name, field.type)])
    return _single_cache[name]
