"""Loads the named SQL blocks of ``service/sql/queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- (?P<name>[a-z_]+) --$", re.MULTILINE)


@cache
def _all() -> dict[str, bytes]:
    text = (resources.files("service.sql") / "queries.sql").read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    out: dict[str, bytes] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
        out[name] = "\n".join(lines).strip().encode()
    return out


def q(name: str) -> bytes:
    """The query named ``name``; KeyError if there is none."""
    return _all()[name]
