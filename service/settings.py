"""Settings: one msgspec Struct read from the ``TFDEPLOY_*`` environment, validated at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

PREFIX = "TFDEPLOY_"
_RATE = re.compile(r"^\s*([1-9][0-9]{0,6})\s*/\s*([smh])\s*$")
# The length of TFDEPLOY_RATE_LIMIT's window, by the unit of Settings.rate_limit_rule.
RATE_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600}


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

    # -- tenants and isolation (docs/security.md)
    # The schema owner's URL: `tfdeploy migrate` (and `up`) migrate with it, while the service
    # connects with TFDEPLOY_DATABASE_URL as a role that cannot alter the tables. Unset: one
    # role for both (docs/operations.md, "Database roles"). Ignored by the embedded PostgreSQL,
    # which has both roles of its own.
    migrate_database_url: str | None = None
    # The local runner refuses to start without a working bubblewrap sandbox unless this is set.
    local_unsandboxed: bool = False
    # GET /metrics without an admin token.
    metrics_public: bool = False

    # -- limits and fair turns (docs/reliability.md, "Limits")
    # One user's running deploys; None: no limit beyond the cap.
    max_running_per_user: int | None = None
    max_output_bytes: int = 10 * 1024 * 1024  # terraform output kept per attempt
    max_state_bytes: int = 64 * 1024 * 1024  # largest tfstate accepted from a run
    max_streams_per_user: int = 32  # open Server-Sent Event streams per user
    rate_limit: str = "50/s"  # requests per user: "<n>/s", "<n>/m" or "<n>/h"
    # Retention: None keeps everything (the default). Events are never deleted; the latest
    # state version of a workspace is never deleted.
    log_retention_days: float | None = None  # terraform output of ended deploys
    input_retention_days: float | None = None  # files and variables of ended deploys
    idempotency_retention_days: float | None = None  # Idempotency-Key records
    state_retention_days: float | None = None  # state versions other than the latest

    # -- plans and approval
    plan_ttl: float = 86400.0  # an unapproved plan is discarded after this many seconds

    # -- providers (docs/providers.md)
    provider_mirror: str | None = None  # a filesystem mirror, packed or unpacked layout
    provider_cache: str | None = None  # default: <data dir>/provider-cache
    # Registry hosts the worker's host may install providers from directly (`direct`) to fill
    # the cache, comma-separated; "*" for any. A user's configuration names the host, so this
    # bounds where user input sends the worker's host (other hosts: only through the operator's
    # mirrors, else left to the run's own init).
    provider_direct_hosts: str = "registry.terraform.io"

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
                "MAX_RUNNING_PER_USER",
                self.max_running_per_user is None or self.max_running_per_user >= 1,
                "must be at least 1",
            ),
            ("MAX_OUTPUT_BYTES", self.max_output_bytes >= 64 * 1024, "must be at least 65536"),
            ("MAX_STATE_BYTES", self.max_state_bytes >= 64 * 1024, "must be at least 65536"),
            ("MAX_STREAMS_PER_USER", self.max_streams_per_user >= 1, "must be at least 1"),
            ("RATE_LIMIT", _RATE.match(self.rate_limit) is not None, "must look like 50/s, 600/m or 10000/h"),
            ("PLAN_TTL", self.plan_ttl > 0, "must be positive"),
            *(
                (name.upper(), value is None or value > 0, "must be positive")
                for name, value in (
                    ("log_retention_days", self.log_retention_days),
                    ("input_retention_days", self.input_retention_days),
                    ("idempotency_retention_days", self.idempotency_retention_days),
                    ("state_retention_days", self.state_retention_days),
                )
            ),
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
            (
                "MIGRATE_DATABASE_URL",
                self.migrate_database_url is None
                or self.migrate_database_url.startswith(("postgresql://", "postgres://")),
                "must be a postgresql:// URL",
            ),
            (
                "MIGRATE_DATABASE_URL",
                self.migrate_database_url is None or self.database_url is not None,
                "needs TFDEPLOY_DATABASE_URL (the embedded PostgreSQL has its own roles)",
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

    @property
    def rate_limit_rule(self) -> tuple[Literal["second", "minute", "hour"], int]:
        """``TFDEPLOY_RATE_LIMIT`` as (unit, requests): "50/s" -> ("second", 50)."""
        m = _RATE.match(self.rate_limit)
        assert m is not None  # checked in __post_init__
        unit: Literal["second", "minute", "hour"] = {"s": "second", "m": "minute", "h": "hour"}[
            m.group(2)
        ]  # type: ignore[assignment]
        return unit, int(m.group(1))

    @property
    def provider_cache_path(self) -> Path:
        """``TFDEPLOY_PROVIDER_CACHE``, else ``<data dir>/provider-cache``."""
        if self.provider_cache:
            return Path(self.provider_cache).expanduser().resolve()
        return self.data_path / "provider-cache"


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
