"""Loads the named SQL blocks of ``service/sql/*.sql``.

Each file holds blocks that start with ``-- name --``, then a description, then the query. Files
are read in name order; a name defined twice (in one file or two) is an error, so one concern's
queries can live in a file of their own (``queries.sql`` for the event store, others beside it).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- (?P<name>[a-z_]+) --$", re.MULTILINE)


@cache
def _all() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    folder = resources.files("service.sql")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _BLOCK.split(entry.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in out:
                raise RuntimeError(f"SQL block {name!r} is defined twice ({entry.name})")
            lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
            out[name] = "\n".join(lines).strip().encode()
    return out


def q(name: str) -> bytes:
    """The query named ``name``; KeyError if there is none."""
    return _all()[name]
