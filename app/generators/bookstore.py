"""Bookstore feed: units sold per item per interval, with an even/odd-hour rhythm.

``item-A`` sells about 20 units in even hours and 10 in odd hours, ``item-B`` about 30 and 15,
``item-C`` about 16 and 8 (rates per hour, scaled to the interval; Poisson counts). ``item-A``
and ``item-B`` get ``unexplained_spike`` anomalies (one interval at 3–5 times the usual sales);
``item-C`` stays anomaly-free.
"""

from __future__ import annotations

import numpy as np

from app.generators.common import (
    Feed,
    FeedSpec,
    Label,
    Series,
    anomaly_count,
    place_windows,
    series_rng,
)

# item -> (units per even hour, units per odd hour, gets spikes)
ITEMS: dict[str, tuple[float, float, bool]] = {
    "item-A": (20.0, 10.0, True),
    "item-B": (30.0, 15.0, True),
    "item-C": (16.0, 8.0, False),
}


def hourly_rate(timestamps: np.ndarray, even: float, odd: float) -> np.ndarray:
    """Units per hour at each timestamp: ``even`` in even UTC hours, ``odd`` in odd ones."""
    hour = (np.floor_divide(timestamps, 3600.0) % 24).astype(np.int64)
    return np.where(hour % 2 == 0, even, odd)


def generate(spec: FeedSpec) -> Feed:
    timestamps = spec.timestamps()
    series: list[Series] = []
    labels: list[Label] = []
    for item, (even, odd, spiky) in ITEMS.items():
        rng = series_rng(spec.seed, "bookstore", item)
        dims = {"item": item}
        mean = hourly_rate(timestamps, even, odd) * (spec.interval / 3600.0)
        units = rng.poisson(mean).astype(np.float64)
        if spiky:
            count = anomaly_count(spec.points, 250)
            for window in place_windows(
                rng, spec.points, [1] * count, start=min(150, spec.points // 3)
            ):
                if window is None:
                    continue
                first, last = window
                units[first] = np.ceil(mean[first] * rng.uniform(3.0, 5.0))
                labels.append(Label(dims, "units", first, last, "unexplained_spike"))
        series.append(Series(dims, "units", units, decimals=0))
    labels.sort(key=lambda label: (label.first, label.dimensions["item"]))
    return Feed("bookstore", spec, series, labels)
