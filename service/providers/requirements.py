"""What providers a run needs: provider addresses, the configuration's requirements, and the
dependency lock file (``.terraform.lock.hcl``) read and written.

Everything here is pure and only ever *reads* user files; what it returns is checked against
strict patterns (addresses, versions, constraints, hashes), because it ends up in generated
configurations and file paths.

The configuration's requirements follow terraform's rules (``internal/configs``): a module
(a directory of ``.tf``/``.tf.json`` files) names providers in ``terraform { required_providers
{ NAME = { source, version } } }``; a local name used without an entry there -- by a resource or
data source type's prefix (``aws_instance`` -> ``aws``), a ``provider "NAME"`` block or a
``provider = NAME.alias`` meta-argument -- implies ``registry.terraform.io/hashicorp/NAME``;
``terraform`` is the built-in provider. Constraints on one provider from several modules all
apply. What cannot be known from the files (the providers of registry or git modules) is not
listed: terraform's own ``init`` in the run finds those.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.validation import LOCK_FILE_NAME, parse_units

__all__ = ["LOCK_FILE_NAME", "LockEntry", "LockFileError", "Provider", "Requirements",
           "config_requirements", "parse_lock_file", "render_lock_file"]

DEFAULT_HOST = "registry.terraform.io"
BUILTIN = ("terraform.io", "builtin")

_HOST = re.compile(r"\A[a-z0-9](?:[a-z0-9.-]{0,250}[a-z0-9])?(?::[0-9]{1,5})?\Z")
_PART = re.compile(r"\A[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?\Z")
_LOCAL_NAME = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_-]{0,63}\Z")
VERSION = re.compile(r"\A[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}(?:-[0-9A-Za-z.-]{1,64})?(?:\+[0-9A-Za-z.-]{1,64})?\Z")
# A version constraint string: operators, versions, commas, spaces. Nothing else, so it can be
# written into a generated configuration as it is.
CONSTRAINT = re.compile(r"\A[0-9A-Za-z.,<>=!~ +-]{1,256}\Z")
HASH = re.compile(r"\A(?:h1|zh):[A-Za-z0-9+/=]{16,128}\Z")

# Block headers at the start of a line: how terraform code is written (and what `terraform fmt`
# produces). A false match (such text inside a heredoc) only costs a cache lookup.
_TYPED_BLOCK = re.compile(r'^[ \t]*(?:resource|data|ephemeral)[ \t]+"?([A-Za-z][A-Za-z0-9_-]*)"?[ \t]', re.M)
_PROVIDER_BLOCK = re.compile(r'^[ \t]*provider[ \t]+"?([A-Za-z][A-Za-z0-9_-]*)"?[ \t]*\{', re.M)
_PROVIDER_ARG = re.compile(r"^[ \t]*provider[ \t]*=[ \t]*([A-Za-z][A-Za-z0-9_-]*)(?:\.[A-Za-z][A-Za-z0-9_-]*)?[ \t]*$", re.M)


@dataclass(frozen=True, order=True)
class Provider:
    """A provider's fully qualified address: ``hostname/namespace/type``."""

    hostname: str
    namespace: str
    type: str

    def __str__(self) -> str:
        return f"{self.hostname}/{self.namespace}/{self.type}"

    @property
    def builtin(self) -> bool:
        return (self.hostname, self.namespace) == BUILTIN

    @classmethod
    def parse(cls, source: str) -> Provider | None:
        """A ``source`` string (``type``, ``namespace/type`` or ``host/namespace/type``) as
        terraform reads it, or None if it is not one this module accepts."""
        if not isinstance(source, str):
            return None
        parts = source.strip().lower().split("/")
        if len(parts) == 1:
            parts = ["hashicorp", *parts]
        if len(parts) == 2:
            parts = [DEFAULT_HOST, *parts]
        if len(parts) != 3:
            return None
        host, namespace, type_ = parts
        if host.endswith(":443"):
            host = host[:-4]
        if not _HOST.match(host) or not _PART.match(namespace) or not _PART.match(type_):
            return None
        return cls(host, namespace, type_)


@dataclass(frozen=True)
class LockEntry:
    """One ``provider`` block of a dependency lock file."""

    provider: Provider
    version: str
    constraints: str | None = None
    hashes: tuple[str, ...] = ()

    def with_hashes(self, more: Iterable[str]) -> LockEntry:
        merged = sorted(set(self.hashes) | set(more))
        return LockEntry(self.provider, self.version, self.constraints, tuple(merged))


@dataclass
class Requirements:
    """What a run needs: each provider with the version constraints on it (empty: any)."""

    providers: dict[Provider, set[str]] = field(default_factory=dict)

    def add(self, provider: Provider, constraint: str | None = None) -> None:
        constraints = self.providers.setdefault(provider, set())
        if constraint:
            constraints.add(constraint)


# ------------------------------------------------------------------ the lock file


class LockFileError(ValueError):
    """The lock file is not one terraform would read."""


def _unquote(value: Any) -> str | None:
    """A python-hcl2 string value (``'"text"'``) without its quotes; None for anything with an
    escape or a template in it, or that is not a plain string."""
    if not isinstance(value, str) or len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return None
    inner = value[1:-1]
    if "\\" in inner or "${" in inner or "%{" in inner or '"' in inner:
        return None
    return inner


def parse_lock_file(text: str) -> dict[Provider, LockEntry]:
    """The ``provider`` blocks of a ``.terraform.lock.hcl``; LockFileError if it does not parse
    or a block is malformed. Entries this module cannot use safely are refused too (terraform
    would refuse them as well: a lock file is machine-written)."""
    import hcl2

    try:
        doc = hcl2.loads(text)
    except Exception as exc:  # lark's errors and python-hcl2's own
        raise LockFileError(f"the lock file does not parse: {str(exc).splitlines()[0][:200]}") from None
    entries: dict[Provider, LockEntry] = {}
    for block in doc.get("provider", []) if isinstance(doc, dict) else []:
        if not isinstance(block, dict):
            continue
        for label, body in block.items():
            address = _unquote(label)
            provider = Provider.parse(address) if address else None
            if provider is None or address is None or len(address.split("/")) != 3:
                raise LockFileError(f"the lock file names an invalid provider {label!r}")
            if not isinstance(body, dict):
                raise LockFileError(f"the lock file's entry for {provider} is not a block")
            version = _unquote(body.get("version"))
            if version is None or not VERSION.match(version):
                raise LockFileError(f"the lock file's entry for {provider} has no valid version")
            constraints = _unquote(body.get("constraints")) if "constraints" in body else None
            if constraints is not None and not CONSTRAINT.match(constraints):
                raise LockFileError(f"the lock file's entry for {provider} has invalid constraints")
            hashes: list[str] = []
            for item in body.get("hashes", []) or []:
                value = _unquote(item)
                if value is None or not HASH.match(value):
                    raise LockFileError(f"the lock file's entry for {provider} has an invalid hash")
                hashes.append(value)
            if provider in entries:
                raise LockFileError(f"the lock file names {provider} twice")
            entries[provider] = LockEntry(provider, version, constraints, tuple(hashes))
    return entries


def render_lock_file(entries: Iterable[LockEntry]) -> str:
    """A ``.terraform.lock.hcl`` as terraform writes it (sorted, hashes sorted)."""
    out = [
        "# This file is maintained automatically by \"terraform init\".",
        "# Manual edits may be lost in future updates.",
    ]
    for entry in sorted(entries, key=lambda e: e.provider):
        out.append("")
        out.append(f'provider "{entry.provider}" {{')
        out.append(f'  version     = "{entry.version}"')
        if entry.constraints is not None:
            out.append(f'  constraints = "{entry.constraints}"')
        if entry.hashes:
            out.append("  hashes = [")
            out.extend(f'    "{h}",' for h in sorted(entry.hashes))
            out.append("  ]")
        out.append("}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ the configuration


def config_requirements(files: Mapping[str, str], *, parse_budget: int | None = None) -> Requirements:
    """The providers the configuration in ``files`` names, with their constraints, per the
    rules in the module docstring. ``parse_budget``: how much HCL (validation.parse_units)
    python-hcl2 may parse; files over it are read for block headers only."""
    modules: dict[str, dict[str, str]] = {}
    for name, content in files.items():
        if name.endswith((".tf", ".tf.json")) and isinstance(content, str):
            directory = name.rsplit("/", 1)[0] if "/" in name else ""
            modules.setdefault(directory, {})[name] = content
    result = Requirements()
    budget = [parse_budget]
    for directory in sorted(modules):
        _module_requirements(modules[directory], result, budget)
    return result


def _module_requirements(files: dict[str, str], result: Requirements, budget: list[int | None]) -> None:
    declared: dict[str, tuple[Provider, str | None]] = {}  # local name -> (address, constraint)
    used: set[str] = set()
    complete = True  # every required_providers block of the module was read
    for name in sorted(files):
        content = files[name]
        if name.endswith(".json"):
            try:
                doc = json.loads(content)
            except ValueError:
                complete = False
                continue
            if not _json_module(doc, declared, used):
                complete = False
            continue
        for pattern in (_TYPED_BLOCK, _PROVIDER_BLOCK, _PROVIDER_ARG):
            used.update(m.group(1) for m in pattern.finditer(content))
        if "required_providers" in content and not _hcl_required_providers(content, declared, budget):
            complete = False
    for provider, constraint in declared.values():
        if not provider.builtin:
            result.add(provider, constraint)
    if not complete:
        # An unread required_providers block may map any local name elsewhere: guessing
        # hashicorp/<name> could fetch the wrong provider, so imply nothing.
        return
    for local in used:
        implied = local.split("_", 1)[0].lower()
        if local in declared or implied in declared or implied == "terraform":
            continue
        implied_provider = Provider.parse(implied)
        if implied_provider is not None:
            result.add(implied_provider)


def _declare(declared: dict[str, tuple[Provider, str | None]], local: str, spec: Any) -> bool:
    if not _LOCAL_NAME.match(local):
        return False
    source: str | None = local
    version: str | None = None
    if isinstance(spec, str):  # the legacy form: NAME = "constraint"
        version = spec
    elif isinstance(spec, dict):
        source = spec.get("source", local)
        version = spec.get("version")
    else:
        return False
    provider = Provider.parse(source) if isinstance(source, str) else None
    if provider is None:
        return False
    if version is not None and (not isinstance(version, str) or not CONSTRAINT.match(version)):
        return False
    declared[local] = (provider, version)
    return True


def _hcl_required_providers(content: str, declared: dict[str, tuple[Provider, str | None]], budget: list[int | None]) -> bool:
    import hcl2

    if budget[0] is not None:
        units = parse_units(content)
        if units > budget[0]:
            return False
        budget[0] -= units
    try:
        doc = hcl2.loads(content)
    except Exception:  # lark's errors, python-hcl2's own, RecursionError
        return False
    ok = True
    for block in doc.get("terraform", []) if isinstance(doc, dict) else []:
        for rp in block.get("required_providers", []) if isinstance(block, dict) else []:
            if not isinstance(rp, dict):
                continue
            for local, spec in rp.items():
                if local.startswith("__"):
                    continue
                if isinstance(spec, dict):
                    spec = {k: _unquote(v) for k, v in spec.items() if k in ("source", "version")}
                    if any(v is None for v in spec.values()):
                        ok = False
                        continue
                else:
                    spec = _unquote(spec)
                if not _declare(declared, local, spec):
                    ok = False
    return ok


def _json_module(doc: Any, declared: dict[str, tuple[Provider, str | None]], used: set[str]) -> bool:
    if not isinstance(doc, dict):
        return False
    ok = True
    terraform = doc.get("terraform", [])
    for block in terraform if isinstance(terraform, list) else [terraform]:
        rps = block.get("required_providers", []) if isinstance(block, dict) else []
        for rp in rps if isinstance(rps, list) else [rps]:
            if not isinstance(rp, dict):
                continue
            for local, spec in rp.items():
                if not _declare(declared, local, spec):
                    ok = False
    for kind in ("resource", "data", "ephemeral"):
        blocks = doc.get(kind, {})
        for group in blocks if isinstance(blocks, list) else [blocks]:
            if isinstance(group, dict):
                used.update(t for t in group if isinstance(t, str))
                for instances in group.values():
                    _json_provider_args(instances, used)
    providers = doc.get("provider", {})
    for group in providers if isinstance(providers, list) else [providers]:
        if isinstance(group, dict):
            used.update(p for p in group if isinstance(p, str))
    return ok


def _json_provider_args(instances: Any, used: set[str]) -> None:
    """``"provider": "NAME.alias"`` meta-arguments in a resource type's instances."""
    items = instances if isinstance(instances, list) else [instances]
    for item in items:
        if not isinstance(item, dict):
            continue
        for body in item.values():
            for b in body if isinstance(body, list) else [body]:
                if isinstance(b, dict) and isinstance(b.get("provider"), str):
                    used.add(b["provider"].split(".", 1)[0])
