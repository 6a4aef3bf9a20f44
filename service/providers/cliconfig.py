"""Terraform CLI configurations: the operator's ``provider_installation`` read, and the ones
tfdeploy generates written.

How terraform combines installation methods (``internal/getproviders/multi_source.go``): each
method has ``include``/``exclude`` patterns (no ``include`` = every provider; ``exclude`` wins);
the versions available for a provider are the UNION of what every method that may handle it
lists, and a chosen version is installed from the FIRST such method (in order) that has it. A
method that fails for another reason than "not found" (a registry or mirror that cannot be
reached) fails the whole ``init``. So a provider meant to install offline must be handled by
offline methods only: tfdeploy excludes it from every network method.

Where the operator's methods come from: terraform's own rules (``internal/command/cliconfig``):
``TF_CLI_CONFIG_FILE`` (or ``TERRAFORM_CONFIG``) if set, else ``~/.terraformrc`` plus the
``*.tfrc`` files of ``~/.terraform.d``, in the worker's environment (a file that does not
exist is skipped, as terraform skips it). No ``provider_installation`` block means terraform's
implied configuration (``provider_source.go``, implicitProviderSource): the local plugin
directories that exist -- ``~/.terraform.d/plugins`` and ``terraform/plugins`` under the XDG
data directories -- as filesystem mirrors, then ``direct`` for every provider none of them
holds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("tfdeploy.providers")

Kind = Literal["direct", "network_mirror", "filesystem_mirror"]
KINDS: tuple[Kind, ...] = ("filesystem_mirror", "network_mirror", "direct")


class CliConfigError(ValueError):
    """The operator's CLI configuration cannot be used."""


@dataclass(frozen=True)
class Method:
    """One installation method of a ``provider_installation`` block."""

    kind: Kind
    location: str | None = None  # a filesystem mirror's path, a network mirror's URL
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def excluding(self, patterns: Iterable[str]) -> Method:
        more = [p for p in patterns if p not in self.exclude]
        return Method(self.kind, self.location, self.include, (*self.exclude, *more))

    def render(self) -> str:
        lines = [f"  {self.kind} {{"]
        if self.kind == "filesystem_mirror":
            lines.append(f"    path    = {_string(self.location or '')}")
        elif self.kind == "network_mirror":
            lines.append(f"    url     = {_string(self.location or '')}")
        if self.include:
            lines.append(f"    include = [{', '.join(_string(p) for p in self.include)}]")
        if self.exclude:
            lines.append(f"    exclude = [{', '.join(_string(p) for p in self.exclude)}]")
        lines.append("  }")
        return "\n".join(lines)


def _string(value: str) -> str:
    """A string literal for the CLI config (HCL 1). Paths and URLs with quotes, backslashes,
    templates or control characters are refused rather than escaped."""
    if any(c in value for c in '"\\\n\r\t') or "${" in value or "%{" in value:
        raise CliConfigError(f"cannot write {value!r} into a CLI configuration")
    return f'"{value}"'


def render(methods: Iterable[Method]) -> str:
    """A CLI configuration with exactly these methods, in order, and nothing else (no
    credentials, no ``plugin_cache_dir``: runs must not write a shared cache)."""
    body = "\n".join(m.render() for m in methods)
    return f"disable_checkpoint = true\n\nprovider_installation {{\n{body}\n}}\n"


# ------------------------------------------------------------------ the operator's config


def operator_config_files(environ: Mapping[str, str]) -> list[Path]:
    explicit = environ.get("TF_CLI_CONFIG_FILE") or environ.get("TERRAFORM_CONFIG")
    if explicit:
        return [Path(explicit)]
    home = environ.get("HOME")
    if not home:
        return []
    files = [Path(home, ".terraformrc")]
    config_dir = Path(home, ".terraform.d")
    if config_dir.is_dir():
        files += sorted(
            p for p in config_dir.iterdir() if p.name.endswith((".tfrc", ".tfrc.json")) and p.is_file()
        )
    return files


def operator_methods(environ: Mapping[str, str] | None = None) -> list[Method]:
    """The operator's provider installation methods, in order; ``[direct]`` when none is
    configured. CliConfigError if a file cannot be read or names two ``provider_installation``
    blocks (terraform refuses that too)."""
    env = os.environ if environ is None else environ
    blocks: list[list[Method]] = []
    for path in operator_config_files(env):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CliConfigError(f"cannot read the CLI configuration {path}: {exc}") from None
        blocks.extend(_provider_installation(path, text))
    if len(blocks) > 1:
        raise CliConfigError("the CLI configuration has more than one provider_installation block")
    if not blocks:
        return implied_methods(env)
    return blocks[0]


def implied_methods(environ: Mapping[str, str]) -> list[Method]:
    """Terraform's implied installation methods (no ``provider_installation`` block)."""
    from service.providers.mirror import scan

    home = environ.get("HOME", "")
    dirs = [Path(home, ".terraform.d", "plugins")] if home else []
    data_home = environ.get("XDG_DATA_HOME") or (str(Path(home, ".local", "share")) if home else "")
    data_dirs = [data_home, *(environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(":")]
    dirs += [Path(d, "terraform", "plugins") for d in data_dirs if d]
    methods: list[Method] = []
    found: set[str] = set()
    for directory in dirs:
        if directory.is_dir():
            methods.append(Method("filesystem_mirror", str(directory)))
            found.update(str(p.provider) for p in scan(directory))
    methods.append(Method("direct", None, (), tuple(sorted(found))))
    return methods


def _provider_installation(path: Path, text: str) -> list[list[Method]]:
    if path.name.endswith(".json"):
        try:
            doc: Any = json.loads(text)
        except ValueError as exc:
            raise CliConfigError(f"{path}: not JSON: {exc}") from None
        found = doc.get("provider_installation") if isinstance(doc, dict) else None
        raw_blocks = found if isinstance(found, list) else [found] if found else []
        return [_methods(path, b, quoted=False) for b in raw_blocks]
    import hcl2

    try:
        doc = hcl2.loads(text)
    except Exception as exc:
        raise CliConfigError(f"{path}: does not parse: {str(exc).splitlines()[0][:200]}") from None
    return [_methods(path, b, quoted=True) for b in doc.get("provider_installation", [])]


def _methods(path: Path, block: Any, *, quoted: bool) -> list[Method]:
    """The methods of one provider_installation block. python-hcl2 groups blocks by kind, so
    two methods of one kind separated by another come out next to each other (terraform keeps
    their order); the versions available are a union either way, only which source a version
    comes from could differ."""
    if not isinstance(block, dict):
        raise CliConfigError(f"{path}: provider_installation is not a block")
    methods: list[Method] = []
    for kind, bodies in block.items():
        if kind.startswith("__") or kind == "dev_overrides":
            continue  # dev_overrides are for provider developers, never for deploys
        if kind not in KINDS:
            raise CliConfigError(f"{path}: unknown installation method {kind!r}")
        for body in bodies if isinstance(bodies, list) else [bodies]:
            body = body if isinstance(body, dict) else {}

            def text(value: Any, kind: str = kind) -> str:
                if quoted and isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if not isinstance(value, str):
                    raise CliConfigError(f"{path}: {kind}: expected a string, got {value!r}")
                return value

            location = None
            if kind == "filesystem_mirror":
                location = text(body.get("path"))
            elif kind == "network_mirror":
                location = text(body.get("url"))
                if not location.startswith("https://"):
                    raise CliConfigError(f"{path}: a network_mirror URL must use https: {location}")
            include = tuple(text(p) for p in body.get("include", []) or [])
            exclude = tuple(text(p) for p in body.get("exclude", []) or [])
            methods.append(Method(kind, location, include, exclude))
    return methods
