"""Why a terraform step failed, from its own diagnostics: a pure classifier.

``classify(step, text)`` -> "config" | "network" | "other". A ``validate`` failure is always the
configuration's. An ``init`` failure is read one ``Error:`` block at a time: a block that names a
connection problem (DNS, TLS, refused, timeouts, a registry that could not be queried) is
"network" -- a retry may fix it; a block that names a problem of the configuration itself (an
invalid source address, a provider no search location holds, no version matching the
constraints, a module directory that is not there, invalid syntax) is "config". A network
problem is checked first within a block: without a network, terraform cannot tell a provider
that does not exist from a registry it cannot reach ("could not connect to
registry.terraform.io"), and that is a network failure. Across blocks, "config" wins: another
attempt cannot fix the configuration, whatever else failed with it. Other steps (plan, apply)
are "network" when a block names a connection problem, else "other".

The patterns are terraform 1.11's wording (tests/test_runners.py holds real messages made with
the binary, offline). Terraform wraps its messages at about 78 columns, so whitespace is
normalised before matching.
"""

from __future__ import annotations

import re

from service.runners.base import FailureKind

NETWORK_PATTERNS = (
    "could not connect to",
    "failed to request discovery document",
    "dial tcp",
    "dial udp",
    "no such host",
    "network is unreachable",
    "connection refused",
    "connection reset",
    "connection timed out",
    "i/o timeout",
    "tls handshake timeout",
    "tls: ",
    "x509:",
    "certificate signed by unknown authority",
    "context deadline exceeded",
    "client.timeout exceeded",
    "timeout awaiting response headers",
    "could not resolve host",
    "temporary failure in name resolution",
    "the request failed after",
    "the request failed, please try again later",
    "failed to retrieve authentication checksums",
    "error accessing remote module registry",
    "unexpected eof",
    "server misbehaving",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway timeout",
    "429 too many requests",
)

CONFIG_PATTERNS = (
    # init refuses a configuration that does not parse or is not valid
    "including problems with the configuration",
    "invalid provider source string",
    "invalid provider registry host",
    "invalid provider namespace",
    "invalid provider type",
    "was not found in any of the search locations",
    "does not have a provider named",
    "no available releases match the given constraints",
    "incompatible provider version",
    "invalid version constraint",
    "invalid module source address",
    "invalid source address",
    "unreadable module directory",
    "module not found",
    "failed to download module",  # a source that resolves but cannot be fetched as given
    "invalid module version constraint",
    "module version requirements have changed",
    "unsupported terraform core version",
    "unsupported argument",
    "unsupported block type",
    "missing required argument",
    "invalid expression",
    "argument or block definition required",
    "invalid block definition",
    "duplicate ",
    "reference to undeclared",
    "invalid reference",
    "unsupported attribute",
    "invalid character",
    "unclosed configuration block",
    "inconsistent dependency lock file",
)

_ERROR = re.compile(r"^\s*(?:[│|]\s*)?Error:\s", re.MULTILINE)
_SPACE = re.compile(r"\s+")
_BOX = re.compile(r"^[ \t]*[│╷╵|][ \t]?", re.MULTILINE)


def _blocks(text: str) -> list[str]:
    """The ``Error:`` blocks of terraform's output, each normalised (lower case, one space)."""
    text = _BOX.sub("", text)
    starts = [m.start() for m in _ERROR.finditer(text)]
    if not starts:
        parts = [text]
    else:
        parts = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [_SPACE.sub(" ", p).strip().lower() for p in parts if p.strip()]


def _kind_of_block(block: str, *, config_possible: bool) -> FailureKind:
    if any(p in block for p in NETWORK_PATTERNS):
        return "network"
    if config_possible and any(p in block for p in CONFIG_PATTERNS):
        return "config"
    return "other"


def classify(step: str, text: str) -> FailureKind:
    """The kind of failure of ``step`` from its diagnostics ``text`` (terraform's stderr)."""
    if step == "validate":
        return "config"
    kinds = {_kind_of_block(b, config_possible=step == "init") for b in _blocks(text)}
    if "config" in kinds:
        return "config"
    if "network" in kinds:
        return "network"
    return "other"
