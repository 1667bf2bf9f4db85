"""Durations as written in configs and on the command line: ``250ms``, ``90s``, ``5m``, ``2h``.

One grammar for every tool: a non-negative number with an optional unit (ms, s, m or min, h, d,
w); a bare number is seconds.
"""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d|w)?\s*$")
_UNIT_SECONDS = {
    "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
    None: 1.0,
}  # fmt: skip


def parse_duration(value: Any) -> float:
    """Seconds of a duration written as a number or ``<n><unit>``.

    >>> parse_duration("2h"), parse_duration("90s"), parse_duration("250ms"), parse_duration(15)
    (7200.0, 90.0, 0.25, 15.0)
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration such as 30s, 5m, 2h or 1d, not {value!r}")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"expected a duration such as 30s, 5m, 2h or 1d; {value!r} is not a duration"
            )
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if value < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return float(value)


def parse_duration_ms(value: Any) -> int:
    """Milliseconds of a duration (see ``parse_duration``).

    >>> parse_duration_ms("60s"), parse_duration_ms("250ms"), parse_duration_ms(2)
    (60000, 250, 2000)
    """
    return round(parse_duration(value) * 1000)
