"""Filesystem mirrors as terraform reads them (``internal/getproviders/filesystem_search.go``),
and terraform's ``h1:`` package hash.

Two layouts, which may be mixed in one directory:

- unpacked: ``HOSTNAME/NAMESPACE/TYPE/VERSION/OS_ARCH/`` (a directory holding the plugin);
- packed: ``HOSTNAME/NAMESPACE/TYPE/terraform-provider-TYPE_VERSION_OS_ARCH.zip``.

Terraform accepts a symlink only as the mirror's top directory (or as a whole package
directory); it never follows one in between, and neither does :func:`scan`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from service.providers.requirements import VERSION, Provider

_CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class Package:
    provider: Provider
    version: str
    platform: str
    packed: bool


def _platform_ok(name: str) -> bool:
    os_, _, arch = name.partition("_")
    return bool(os_) and bool(arch) and all(c.isalnum() or c == "_" for c in name)


def scan(root: Path) -> list[Package]:
    """The packages a filesystem mirror holds (any platform). Only directory entries are
    read: the packages themselves are not opened."""
    found: list[Package] = []
    try:
        base = root.resolve(strict=True)
    except OSError:
        return found
    for host in _dirs(base):
        for namespace in _dirs(host):
            for type_dir in _dirs(namespace):
                provider = Provider.parse(f"{host.name}/{namespace.name}/{type_dir.name}")
                if provider is None:
                    continue
                try:
                    entries = list(os.scandir(type_dir))
                except OSError:
                    continue
                prefix = f"terraform-provider-{provider.type}_"
                for entry in entries:
                    lowered = entry.name.lower()
                    if entry.is_file() and lowered.startswith(prefix) and lowered.endswith(".zip"):
                        parts = lowered[len(prefix):-4].split("_")
                        if len(parts) >= 3 and VERSION.match(parts[0]):
                            found.append(Package(provider, parts[0], "_".join(parts[1:3]), True))
                    elif entry.is_dir(follow_symlinks=False) and VERSION.match(entry.name):
                        for platform in _dirs(Path(entry.path), follow_last=True):
                            if _platform_ok(platform.name):
                                found.append(Package(provider, entry.name, platform.name, False))
    return sorted(found)


def _dirs(path: Path, *, follow_last: bool = False) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=follow_last)]
    except OSError:
        return []


def providers_for(root: Path, platform: str) -> set[Provider]:
    """The providers a mirror holds at least one package of for ``platform``."""
    return {p.provider for p in scan(root) if p.platform == platform}


def hash_dir(path: Path) -> str:
    """Terraform's ``h1:`` hash of an unpacked package: Go's dirhash.Hash1 -- the sha256 of the
    lines ``<sha256 hex>  <relative path>\\n`` of every file, sorted by path."""
    base = Path(os.path.realpath(path))
    names: list[str] = []
    for directory, _, files in os.walk(base):
        for name in files:
            names.append(Path(directory, name).relative_to(base).as_posix())
    summary = hashlib.sha256()
    for name in sorted(names):
        digest = hashlib.sha256()
        with open(base / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        summary.update(f"{digest.hexdigest()}  {name}\n".encode())
    return "h1:" + base64.b64encode(summary.digest()).decode()


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            total += st.st_size
    return total
