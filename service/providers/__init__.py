"""How a run installs providers (docs/providers.md): from the operator's mirror with no network,
from the host's cache (filled once per provider version), the rest from the usual source.

:meth:`Providers.setup` is called by the worker before a run takes its place under the cap. It

1. scans ``TFDEPLOY_PROVIDER_MIRROR`` for the providers it holds: those install from it and from
   nothing else, so a run that needs only them works with network ``none``;
2. works out the other providers the run needs -- the exact versions of the lock file it will
   use, else the configuration's requirements (:mod:`service.providers.requirements`) -- and
   makes sure each is in the cache (:mod:`service.providers.cache`), fetched on the host if
   missing, once per host;
3. returns the :class:`~service.runners.base.ProviderSetup`: a CLI configuration whose
   ``provider_installation`` names the mirror (its providers only), the cache (the cached
   providers this run uses, only) and then the operator's own network methods for everything
   else (excluding the above), plus the read-only mounts of mirror and cache.

Whatever cannot be resolved on the host (a registry module's providers, a source that cannot be
reached now, a lock file whose hashes do not describe the cached package) is left to the run's
own ``terraform init``: correct, just not cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.providers.cache import Cached, FillError, ProviderCache
from service.providers.cliconfig import CliConfigError, Method, operator_methods, render
from service.providers.mirror import providers_for
from service.providers.requirements import (
    LOCK_FILE_NAME,
    LockEntry,
    LockFileError,
    Provider,
    config_requirements,
    parse_lock_file,
    render_lock_file,
)
from service.runners.base import PROVIDERS_ROOT, ProviderSetup
from service.settings import Settings
from service.validation import HCL_PARSE_BUDGET

__all__ = [
    "CACHE_PATH",
    "LOCK_FILE_NAME",
    "MIRROR_PATH",
    "CliConfigError",
    "Prepared",
    "Providers",
]

log = logging.getLogger("tfdeploy.providers")

MIRROR_PATH = f"{PROVIDERS_ROOT}/mirror"
CACHE_PATH = f"{PROVIDERS_ROOT}/cache"
# How much HCL python-hcl2 parses for a run's requirements: validation's own budget (the API
# parsed at most this much of the request already).
_PARSE_BUDGET = HCL_PARSE_BUDGET


@dataclass
class Prepared:
    """What :meth:`Providers.setup` gives a run."""

    setup: ProviderSetup
    lock_file: str | None  # the lock file the run uses (hashes of cached packages added)
    notes: list[str] = field(default_factory=list)  # one line per provider: where it comes from
    fetched: list[str] = field(default_factory=list)  # "addr version" downloaded for this run


class Providers:
    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        terraform: str | None = None,
    ) -> None:
        """``environ``: the worker's terraform environment (the operator's CLI config, proxy and
        CA settings, registry tokens); it is read for host-side fills only, never passed to runs.
        Raises CliConfigError if the operator's CLI configuration cannot be used."""
        self.environ = dict(os.environ if environ is None else environ)
        self.mirror = Path(settings.provider_mirror).expanduser().resolve() if settings.provider_mirror else None
        self.cache_root = settings.provider_cache_path
        self.timeout = settings.deploy_timeout
        self.direct_hosts = settings.provider_direct_hosts.split(",")
        self.terraform = terraform or self.environ.get("TFDEPLOY_TERRAFORM") or shutil.which(
            "terraform", path=self.environ.get("PATH")
        )
        self.methods = operator_methods(self.environ)
        self._cache: ProviderCache | None = None
        self._platform: str | None = None
        self._init_lock = asyncio.Lock()

    # ---------------------------------------------------------------- the run's setup

    async def setup(self, files: Mapping[str, str], lock_file: str | None) -> Prepared:
        """The providers part of a run (see the module docstring). Never raises for a provider
        that cannot be had: that one is left to the run's own init, with a note."""
        notes: list[str] = []
        cache = await self._get_cache(notes)
        platform = self._platform or "linux_amd64"
        mirrored: set[Provider] = set()
        if self.mirror is not None:
            mirrored = await asyncio.to_thread(providers_for, self.mirror, platform)
            if not mirrored:
                notes.append(f"provider mirror {self.mirror} holds no provider for {platform}")
        locked: dict[Provider, LockEntry] = {}
        if lock_file:
            try:
                locked = parse_lock_file(lock_file)
            except LockFileError as exc:
                notes.append(f"{LOCK_FILE_NAME} not used for caching: {exc}")
        requirements = await asyncio.to_thread(config_requirements, files, parse_budget=_PARSE_BUDGET)

        wanted: dict[Provider, tuple[str | None, tuple[str, ...], LockEntry | None]] = {}
        for provider, pinned in locked.items():
            wanted[provider] = (pinned.version, (), pinned)
        for provider, constraints in requirements.providers.items():
            wanted.setdefault(provider, (None, tuple(sorted(constraints)), None))
        for provider in sorted(wanted):
            if provider.builtin:
                del wanted[provider]
            elif provider in mirrored:
                del wanted[provider]
                notes.append(f"{provider}: from the provider mirror")

        used: dict[Provider, Cached] = {}
        augmented: dict[Provider, LockEntry] = {}
        fetched: list[str] = []
        if cache is not None and wanted:
            order = sorted(wanted)
            results = await asyncio.gather(
                *(
                    cache.ensure(p, version=wanted[p][0], constraints=wanted[p][1], lock_entry=wanted[p][2])
                    for p in order
                ),
                return_exceptions=True,
            )
            for provider, result in zip(order, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, FillError | OSError):
                        raise result
                    first = str(result).strip().splitlines()
                    notes.append(f"{provider}: not cached, left to terraform init ({first[-1] if first else result})")
                    continue
                entry = locked.get(provider)
                if result.compatible(entry):
                    used[provider] = result
                elif entry is not None and result.vouched_for(entry):
                    used[provider] = result
                    augmented[provider] = entry.with_hashes([result.h1])
                else:
                    notes.append(
                        f"{provider} {result.version}: the lock file's hashes do not match the cached "
                        f"{platform} package; left to terraform init"
                    )
                    continue
                if result.fetched:
                    fetched.append(f"{provider} {result.version}")
                notes.append(
                    f"{provider} {result.version}: from the provider cache"
                    + (" (fetched now)" if result.fetched else "")
                )
        elif wanted and cache is None:
            notes.append("no provider cache (see above, or no terraform on the worker's host): providers left to terraform init")

        if augmented:
            lock_file = render_lock_file({**locked, **augmented}.values())
        return Prepared(self._setup(mirrored, used), lock_file, notes, fetched)

    def _setup(self, mirrored: set[Provider], cached: Mapping[Provider, Cached]) -> ProviderSetup:
        mounts: dict[str, str] = {}
        methods: list[Method] = []
        offline: list[str] = []
        if self.mirror is not None and mirrored:
            mounts[MIRROR_PATH] = str(self.mirror)
            include = tuple(sorted(str(p) for p in mirrored))
            methods.append(Method("filesystem_mirror", MIRROR_PATH, include))
            offline += include
        if cached and self._cache is not None:
            mounts[CACHE_PATH] = str(self._cache.providers_dir)
            include = tuple(sorted(str(p) for p in cached))
            methods.append(Method("filesystem_mirror", CACHE_PATH, include))
            offline += include
        # The operator's filesystem mirrors are host paths, not in the run: their providers
        # reach runs through the cache.
        methods += [m.excluding(sorted(offline)) for m in self.methods if m.kind != "filesystem_mirror"]
        return ProviderSetup(mounts=mounts, cli_config=render(methods), env={})

    # ---------------------------------------------------------------- RunRequest fields

    async def run_inputs(self, files: dict[str, str], kept_lock: str | None) -> dict[str, Any]:
        """The RunRequest fields for a run of ``files``: the files (without a lock file), the
        lock file the run uses -- the deploy's own ``.terraform.lock.hcl``, else the workspace's
        kept one (``kept_lock``), with the hashes of cached packages added -- and the
        ProviderSetup."""
        from service.lockfiles import lock_for_run

        prepared = await self.setup(files, lock_for_run(files, kept_lock))
        for note in prepared.notes:
            log.info("providers: %s", note)
        lock = prepared.lock_file
        return {
            "files": {k: v for k, v in files.items() if k != LOCK_FILE_NAME},
            "lock_file": lock.encode() if lock is not None else None,
            "providers": prepared.setup,
        }

    # ---------------------------------------------------------------- the cache

    async def _get_cache(self, notes: list[str]) -> ProviderCache | None:
        async with self._init_lock:
            if self._cache is not None:
                return self._cache
            if not self.terraform:
                return None
            platform = await self._terraform_platform()
            if platform is None:
                notes.append(f"{self.terraform} version failed: providers not cached")
                return None
            self._platform = platform
            try:
                self._cache = await asyncio.to_thread(
                    ProviderCache,
                    self.cache_root,
                    terraform=self.terraform,
                    platform=platform,
                    methods=self.methods,
                    environ=self.environ,
                    timeout=self.timeout,
                    direct_hosts=self.direct_hosts,
                )
            except OSError as exc:
                notes.append(f"provider cache {self.cache_root} unusable ({exc}): providers not cached")
                return None
            return self._cache

    async def _terraform_platform(self) -> str | None:
        assert self.terraform is not None
        try:
            proc = await asyncio.create_subprocess_exec(
                self.terraform, "version", "-json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                env={"PATH": self.environ.get("PATH", os.defpath), "CHECKPOINT_DISABLE": "1"},
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            platform = json.loads(out).get("platform")
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("cannot run %s version: %s", self.terraform, exc)
            return None
        return platform if isinstance(platform, str) and platform else None
