"""Synthetic market, ops and bookstore feeds with labelled, injected anomalies.

>>> feed = generate_feed("bookstore", FeedSpec(seed=1, interval=3600.0, points=48))
>>> sorted({series.dimensions["item"] for series in feed.series})
['item-A', 'item-B', 'item-C']
>>> next(feed.records())
{'timestamp': '2026-01-05T00:00:00.000Z', 'item': 'item-A', 'units': 18}
"""

from __future__ import annotations

from collections.abc import Callable

from app.generators import bookstore, market, ops
from app.generators.common import Feed, FeedSpec, Label, Series

FEEDS: dict[str, Callable[[FeedSpec], Feed]] = {
    "market": market.generate,
    "ops": ops.generate,
    "bookstore": bookstore.generate,
}

#: The interval of each feed when none is given: minute bars, minute metrics, hourly sales.
DEFAULT_INTERVALS: dict[str, float] = {"market": 60.0, "ops": 60.0, "bookstore": 3600.0}


def generate_feed(name: str, spec: FeedSpec) -> Feed:
    """The feed ``name`` (one of ``FEEDS``) for ``spec``; the same spec gives the same feed."""
    try:
        generator = FEEDS[name]
    except KeyError:
        raise ValueError(f"unknown feed {name!r}; known: {', '.join(FEEDS)}") from None
    return generator(spec)


__all__ = ["DEFAULT_INTERVALS", "FEEDS", "Feed", "FeedSpec", "Label", "Series", "generate_feed"]
