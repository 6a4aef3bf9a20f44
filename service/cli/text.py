"""Text in and out of the terminal: ages given as arguments (``30m``, ``1h``), and what is printed
-- times, and text a user chose, with its control characters shown as escapes.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta


def parse_age(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("use a number and a unit: 30m, 1h, 2d, 1w")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """Text for a terminal: control characters (ANSI escapes, carriage returns, ...) shown as
    escapes, never interpreted. A user's variable value may carry them."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


def when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M}" if at else "-"
