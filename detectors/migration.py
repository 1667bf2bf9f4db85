"""Upgrade a detector snapshot's state from an earlier format, so an upgrade keeps every model.

A worker restores its series from snapshots written by the release before it. Each step here
turns one format's state into the next; the forest itself (krcf's msgpack) is carried over
unchanged, so no series goes back to LEARNING. Format 3 (the first release) to 4:

- the calibration's Gaussian statistics of the forest score become a tail with the same mean
  and spread; the deviation tails start afresh (they report after ``score_warmup`` points);
- the daily references keep their slots (format 3 counted points; format 4 counts time steps,
  which agree up to the snapshot);
- a multivariate forest was fed unscaled values, so its variables keep scale 1;
- report-once bookkeeping and new-extreme ranges are dropped: the score no longer uses them.

Format 4 to 5 changes the encoding only (zstd instead of zlib, the daily references' buffers
beside the JSON state instead of in it as hex; ``detectors.rcf``): the buffers become bytes.

Format 5 to 6 judges each deviation also in units of the recent volatility (a second tail per
variable, ``detectors.calibration``). The recent volatility starts as the deviation tail's
long-run mean and the new tail as the deviation tail in those units, so both judge from the
first point on, and alike until the volatility moves.

>>> state = upgrade_state({"dimensions": 1, "steps": [60.0, 60.0], "fits": [[2.0, 3.0]],
...     "last_values": [5.0], "calibrator": {"window": [0.7], "stat": [0.7, 0.01, 500]}}, 3)
>>> state["step"], state["scales"], state["calibrator"]["forest"][:2]
(60.0, [1.0], [500, 0.7])
"""

from __future__ import annotations

import math
import statistics
from typing import Any

_HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)


def upgrade_state(state: dict[str, Any], version: int) -> dict[str, Any]:
    """The state of a format-``version`` snapshot in the current format (6)."""
    if version == 3:
        state = _from_3(state)
    if version <= 4:
        state = _from_4(state)
    if version <= 5:
        state = _from_5(state)
    return state


def _from_5(state: dict[str, Any]) -> dict[str, Any]:
    """Relative deviation tails from the deviation tails.

    >>> state = _from_5({"calibrator": {"deviations": [
    ...     [400, 2.0, 0.4, 3.0, 18.0, 0.1, 0.4, 40.0]]}})
    >>> state["calibrator"]["volatility"]
    [2.0]
    >>> state["calibrator"]["relative"]
    [[400, 1.0, 0.4, 1.5, 4.5, 0.1, 0.4, 20.0]]
    """
    calibrator = dict(state["calibrator"])
    volatility, relative = [], []
    for tail in calibrator["deviations"]:
        count, mean, over, size, shape_moment, *fit = tail
        volatility.append(mean)
        if mean > 0.0:
            scaled = [count, 1.0, over, size / mean, shape_moment / (mean * mean)]
            if fit:
                shape, base, limit = fit
                scaled += [shape, base, limit / mean]
            relative.append(scaled)
        else:  # nothing learned yet: the new tail learns with it
            relative.append(list(tail))
    calibrator["volatility"] = volatility
    calibrator["relative"] = relative
    return {**state, "calibrator": calibrator}


def _from_4(state: dict[str, Any]) -> dict[str, Any]:
    """The daily references' buffers, hex in format 4, as bytes.

    >>> _from_4({"seasonal": [{"period": 1, "days": 1, "count": 0, "buffer": "0000c07f"}]})
    {'seasonal': [{'period': 1, 'days': 1, 'count': 0, 'buffer': b'\\x00\\x00\\xc0\\x7f'}]}
    """
    seasonal = state.get("seasonal")
    if seasonal is None:
        return state
    return {**state, "seasonal": [{**s, "buffer": bytes.fromhex(s["buffer"])} for s in seasonal]}


def _from_3(state: dict[str, Any]) -> dict[str, Any]:
    dimensions = state["dimensions"]
    mean, variance, count = state["calibrator"]["stat"]
    spread = math.sqrt(max(variance, 0.0))
    forest = [count, mean, 0.5, spread * _HALF_NORMAL_MEAN, spread * spread]
    # The deviation tails start empty: format 3 kept nothing to fit them on, and they learn
    # for ``score_warmup`` points before they report (the forest and repeats report at once).
    deviations = [[0, 0.0, 0.5, 0.0, 0.0] for _ in range(dimensions)]
    last_values = state["last_values"] or [None] * dimensions
    steps = state["steps"]
    return {
        **state,
        "calibrator": {
            "window": state["calibrator"]["window"],
            "glow": 0.0,
            "recent": [0.0] * dimensions,
            "forest": forest,
            "deviations": deviations,
            # How often and how long the series repeats a value is unknown: learned from here
            # on, starting from "often" (no stale report until it has shown it rarely does).
            "repeats": [[value, 0, [0, 0.0, 0.5, 0.0, 0.0], 0.5, 100] for value in last_values],
        },
        "step": statistics.median(steps) if steps else 0.0,
        "incident": 0,
        "scales": [1.0] * dimensions,
        "pending": [],
    }
