"""The host's provider cache: each provider version downloaded once per host, then read by
every run.

Layout under ``TFDEPLOY_PROVIDER_CACHE``:

- ``providers/``: an unpacked filesystem mirror (``HOST/NAMESPACE/TYPE/VERSION/OS_ARCH/``). Runs
  read it, mounted read-only; only complete packages ever appear in it (an atomic rename).
- ``meta/HOST/NAMESPACE/TYPE/VERSION/OS_ARCH.json``: the package's ``h1:`` hash, the hashes its
  source vouched for, its size.
- ``locks/HOST__NAMESPACE__TYPE.lock``: one ``flock`` per provider, held while a version of it
  is resolved or fetched.
- ``staging/``: private working directories of fills in progress.

A fill is a host-side ``terraform init`` of a generated configuration (one ``required_providers``
entry, no user code) in a private staging directory, with the operator's installation methods
(:mod:`service.providers.cliconfig`), then a rename of the package it installed into
``providers/``. Terraform's own ``plugin_cache_dir`` is never used: it is not safe for
concurrent ``init`` (terraform issue 31964).

Why the lock is per provider and not per version: when the version is known (a lock file pins
it) a present version needs no lock at all; when it is not (constraints only), terraform has to
resolve it first, which is only possible by running the fill -- so fills of one provider take
turns, and a fill that resolves to a version already cached links it (the cache is the first
method of the fill's own CLI config) instead of downloading it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.providers.cliconfig import Method, render
from service.providers.mirror import hash_dir, tree_bytes
from service.providers.requirements import (
    LOCK_FILE_NAME,
    VERSION,
    LockEntry,
    LockFileError,
    Provider,
    parse_lock_file,
    render_lock_file,
)

log = logging.getLogger("tfdeploy.providers")

# A fill that failed is not tried again for this long (in this process): deploys that start
# together, or follow each other, do not each wait for an unreachable source in turn.
FAILURE_MEMORY = 60.0
# A version resolved from constraints is taken as the newest for this long (in this process):
# deploys that start together, or follow each other, do not each ask the source again. A
# release published meanwhile is picked up by the next resolution after it.
RESOLUTION_MEMORY = 60.0
LOCK_POLL_MIN = 0.02
LOCK_POLL_MAX = 0.25
OUTPUT_TAIL = 4000
# The worker's environment is the fill's, minus what would change where terraform reads its
# configuration or writes plugins.
_DROPPED_ENV = ("TF_PLUGIN_CACHE_DIR", "TF_DATA_DIR", "TF_WORKSPACE", "TF_CLI_CONFIG_FILE", "TERRAFORM_CONFIG")


class FillError(Exception):
    """A provider could not be resolved or fetched on the host (terraform's words)."""


@dataclass(frozen=True)
class Cached:
    """A package in the cache."""

    provider: Provider
    version: str
    platform: str
    path: Path  # the unpacked package directory (host path)
    h1: str
    vouched: tuple[str, ...]  # hashes its source vouched for (the fill's lock file)
    size: int
    fetched: bool = False  # this call put it there

    def compatible(self, entry: LockEntry | None) -> bool:
        """Whether terraform accepts this package for a lock file entry: it checks an unpacked
        package only against ``h1:`` hashes, and takes one whose entry lists ``zh:`` hashes
        only (``internal/providercache/package_install.go``, installFromLocalDir)."""
        if entry is None:
            return True
        if entry.version != self.version:
            return False
        suitable = [h for h in entry.hashes if not h.startswith("zh:")]
        return not suitable or self.h1 in entry.hashes

    def vouched_for(self, entry: LockEntry) -> bool:
        """Whether this package's source vouched for a hash the entry lists: the entry then
        describes this very release, and terraform itself would add this package's ``h1:``
        to it on installing it (what :meth:`Providers.setup` does)."""
        return entry.version == self.version and bool(set(entry.hashes) & set(self.vouched))


class ProviderCache:
    def __init__(
        self,
        root: Path,
        *,
        terraform: str,
        platform: str,
        methods: Sequence[Method],
        environ: Mapping[str, str],
        timeout: float = 3600.0,
        direct_hosts: Sequence[str] = ("*",),
    ) -> None:
        self.root = root
        self.providers_dir = root / "providers"
        self.terraform = terraform
        self.platform = platform
        self.methods = list(methods)
        self.environ = environ
        self.timeout = timeout
        self.direct_hosts = {h.strip().lower() for h in direct_hosts if h.strip()}
        self._resolved: dict[tuple[Provider, tuple[str, ...]], tuple[float, str]] = {}
        self._failures: dict[tuple[Provider, str | None, tuple[str, ...], LockEntry | None], tuple[float, str]] = {}
        for sub in ("providers", "meta", "locks", "staging"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Runs read providers/ as another user (Docker: nobody).
        for path in (root, self.providers_dir):
            path.chmod(0o755)

    # ---------------------------------------------------------------- reading

    def package_dir(self, provider: Provider, version: str) -> Path:
        return self.providers_dir / provider.hostname / provider.namespace / provider.type / version / self.platform

    def _meta_path(self, provider: Provider, version: str) -> Path:
        return self.root / "meta" / provider.hostname / provider.namespace / provider.type / version / f"{self.platform}.json"

    def lookup(self, provider: Provider, version: str) -> Cached | None:
        """The cached package of this version, or None. Lock-free: a package is either absent
        or complete."""
        path = self.package_dir(provider, version)
        if not path.is_dir():
            return None
        meta = self._meta_path(provider, version)
        try:
            doc = json.loads(meta.read_text())
            h1, vouched, size = str(doc["h1"]), tuple(doc["vouched"]), int(doc["size"])
        except (OSError, ValueError, KeyError, TypeError):
            # Put there by hand, or meta lost: hash it now (once).
            h1, size = hash_dir(path), tree_bytes(path)
            vouched = (h1,)
            self._write_meta(provider, version, h1, vouched, size)
        return Cached(provider, version, self.platform, path, h1, vouched, size)

    def versions(self, provider: Provider) -> list[str]:
        base = self.providers_dir / provider.hostname / provider.namespace / provider.type
        try:
            names = [p.name for p in base.iterdir() if VERSION.match(p.name)]
        except OSError:
            return []
        return sorted(n for n in names if (base / n / self.platform).is_dir())

    def _write_meta(self, provider: Provider, version: str, h1: str, vouched: Sequence[str], size: int) -> None:
        path = self._meta_path(provider, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"h1": h1, "vouched": sorted(set(vouched)), "size": size, "at": time.time()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".meta-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- filling

    async def ensure(
        self,
        provider: Provider,
        *,
        version: str | None = None,
        constraints: Sequence[str] = (),
        lock_entry: LockEntry | None = None,
    ) -> Cached:
        """The package of ``provider`` a run should use, in the cache: ``version`` exactly (a
        lock file's), else the newest the operator's sources offer within ``constraints``.
        Fetched if missing, once per host however many callers ask at once. FillError if it
        cannot be (terraform's message)."""
        wanted = tuple(sorted(set(constraints)))
        found = await asyncio.to_thread(self._known, provider, version, wanted)
        if found is not None:
            return found
        key = (provider, version, wanted, lock_entry)
        async with self._lock(provider):
            # Filled while we waited?
            found = await asyncio.to_thread(self._known, provider, version, wanted)
            if found is not None:
                return found
            failed = self._failures.get(key)
            if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY:
                raise FillError(f"{failed[1]} ({time.monotonic() - failed[0]:.0f}s ago)")
            try:
                result = await self._fill(provider, version, constraints, lock_entry)
            except FillError as exc:
                self._failures[key] = (time.monotonic(), str(exc))
                raise
            if version is None:
                self._resolved[(provider, wanted)] = (time.monotonic(), result.version)
            return result

    def _known(self, provider: Provider, version: str | None, constraints: tuple[str, ...]) -> Cached | None:
        """The cached package for an exact version, or for constraints resolved lately."""
        if version is None:
            resolved = self._resolved.get((provider, constraints))
            if resolved is None or time.monotonic() - resolved[0] >= RESOLUTION_MEMORY:
                return None
            version = resolved[1]
        return self.lookup(provider, version)

    @contextlib.asynccontextmanager
    async def _lock(self, provider: Provider) -> AsyncIterator[None]:
        """The provider's flock, waited for by polling (a blocked flock() in a thread could not
        be given up when the caller is cancelled)."""
        path = self.root / "locks" / f"{_key(provider)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            pause = LOCK_POLL_MIN
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, LOCK_POLL_MAX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _fill(
        self,
        provider: Provider,
        version: str | None,
        constraints: Sequence[str],
        lock_entry: LockEntry | None,
    ) -> Cached:
        staging = await asyncio.to_thread(self._stage, provider, version, constraints, lock_entry)
        try:
            env = {k: v for k, v in self.environ.items() if k not in _DROPPED_ENV and not k.startswith("TF_CLI_ARGS")}
            env.update(
                TF_CLI_CONFIG_FILE=str(staging / "cli.tfrc"),
                CHECKPOINT_DISABLE="1",
                TF_IN_AUTOMATION="1",
                TF_INPUT="0",
            )
            started = time.monotonic()
            await self._run(["init", "-input=false", "-no-color", "-backend=false"], staging, env)
            # Hashing and moving a package (hundreds of MB for some) is no work for the loop.
            cached = await asyncio.to_thread(self._adopt, staging, provider)
            if cached.fetched:
                log.info(
                    "provider %s %s fetched into the cache (%d bytes, %.1fs)",
                    provider, cached.version, cached.size, time.monotonic() - started,
                )
            return cached
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    def _stage(
        self, provider: Provider, version: str | None, constraints: Sequence[str], lock_entry: LockEntry | None
    ) -> Path:
        """A private directory with the fill's configuration, lock file and CLI config."""
        methods = self.methods_for(provider)
        if not any(_handles(m, provider) for m in methods):
            raise FillError(
                f"{provider}: no installation method the worker's host may use for it (direct "
                f"installation from {provider.hostname} is not in TFDEPLOY_PROVIDER_DIRECT_HOSTS)"
            )
        if version is None:
            # Resolving: a version already here is linked, not downloaded again.
            methods = [Method("filesystem_mirror", str(self.providers_dir), (str(provider),)), *methods]
        staging_root = self.root / "staging"
        # Under the provider's lock, any staging dir of this provider is a dead fill's.
        # "=" is in no key (hostnames, namespaces and types hold none): the glob matches this
        # provider's staging directories only, never those of one whose type merely starts
        # like it (google / google-beta), whose fill may be running under its own lock.
        for stale in staging_root.glob(f"{_key(provider)}=*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_key(provider)}=", dir=staging_root))
        wanted = f"= {version}" if version is not None else ", ".join(sorted(set(constraints)))
        version_line = f'\n      version = "{wanted}"' if wanted else ""
        (staging / "main.tf").write_text(
            "terraform {\n  required_providers {\n"
            f'    p = {{\n      source  = "{provider}"{version_line}\n    }}\n'
            "  }\n}\n"
        )
        if lock_entry is not None:
            # The download is checked against the run's own lock file.
            (staging / LOCK_FILE_NAME).write_text(render_lock_file([lock_entry]))
        (staging / "cli.tfrc").write_text(render(methods))
        return staging

    def methods_for(self, provider: Provider) -> list[Method]:
        """The operator's methods a fill of ``provider`` may use: ``direct`` only for the
        allowed registry hosts (the hostname comes from user input)."""
        if "*" in self.direct_hosts or provider.hostname in self.direct_hosts:
            return list(self.methods)
        return [m for m in self.methods if m.kind != "direct"]

    def _adopt(self, staging: Path, provider: Provider) -> Cached:
        """Move the package the fill's init installed into the cache (or find it there)."""
        try:
            entries = parse_lock_file((staging / LOCK_FILE_NAME).read_text())
        except (OSError, LockFileError) as exc:
            raise FillError(f"{provider}: terraform init wrote no usable lock file: {exc}") from None
        entry = entries.get(provider)
        if entry is None:
            raise FillError(f"{provider}: terraform init did not install it")
        installed = staging / ".terraform" / "providers" / provider.hostname / provider.namespace / provider.type / entry.version / self.platform
        if installed.is_symlink():
            # Terraform links a package from an unpacked filesystem mirror: the cache's own
            # (already here), or one of the operator's, which runs cannot see: copy that.
            real = Path(os.path.realpath(installed))
            if self.providers_dir.resolve() in real.parents:
                found = self.lookup(provider, entry.version)
                if found is None:
                    raise FillError(f"{provider} {entry.version}: linked from the cache but not in it")
                return found
            installed = staging / "copy"
            shutil.copytree(real, installed, symlinks=False)
        if not installed.is_dir():
            raise FillError(f"{provider} {entry.version}: no package for {self.platform}")
        h1 = hash_dir(installed)
        size = tree_bytes(installed)
        _readable(installed)
        target = self.package_dir(provider, entry.version)
        self._write_meta(provider, entry.version, h1, (*entry.hashes, h1), size)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _readable_parents(target.parent, self.providers_dir)
        try:
            os.rename(installed, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Put there outside our lock (by hand): keep what is there.
            found = self.lookup(provider, entry.version)
            if found is None:
                raise
            return found
        vouched = tuple(sorted({*entry.hashes, h1}))
        return Cached(provider, entry.version, self.platform, target, h1, vouched, size, fetched=True)

    async def _run(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.terraform, *args, cwd=cwd, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except BaseException:
            # Timed out or cancelled: the whole process group goes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(BaseException):
                await proc.wait()
            raise
        if proc.returncode != 0:
            text = out.decode(errors="replace").strip()
            raise FillError(text[-OUTPUT_TAIL:] or f"terraform init exited with {proc.returncode}")


def _handles(method: Method, provider: Provider) -> bool:
    """terraform's CanHandleProvider for one method (exclude wins; no include = all)."""
    def matches(patterns: Sequence[str]) -> bool:
        for pattern in patterns:
            parts = pattern.lower().split("/")
            if len(parts) == 2:
                parts = ["registry.terraform.io", *parts]
            if len(parts) != 3:
                continue
            host, namespace, type_ = parts
            if (host in ("*", provider.hostname) and namespace in ("*", provider.namespace)
                    and type_ in ("*", provider.type)):
                return True
        return False

    if matches(method.exclude):
        return False
    return not method.include or matches(method.include)


def _key(provider: Provider) -> str:
    return f"{provider.hostname}__{provider.namespace}__{provider.type}".replace(":", "_")


def _readable(tree: Path) -> None:
    """Directories 0755 and files readable by all (executables keep their x bits): runs read
    the cache as another user."""
    for directory, _, files in os.walk(tree):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            os.chmod(path, (mode & 0o777) | 0o444 | (0o111 if mode & 0o100 else 0))


def _readable_parents(path: Path, top: Path) -> None:
    while path != top and top in path.parents:
        path.chmod(0o755)
        path = path.parent
