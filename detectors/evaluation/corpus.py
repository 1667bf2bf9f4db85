"""A labelled corpus in the NAB layout, in memory: one ``CorpusFile`` per series.

Windows are row positions, found once by ``window_rows``, because the scorer aligns by row: some
files repeat a timestamp (daylight saving) or step backwards. Reading the files from disk is
``app.corpus.load_corpus``'s job (detectors/ does no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # identity equality: arrays do not compare, and the scorer
class CorpusFile:  # caches per-file layouts keyed by the object
    """One labelled series: values in row order and its windows as inclusive row ranges."""

    category: str
    name: str
    timestamps: np.ndarray  # epoch seconds (float64), naive timestamps read as UTC
    values: np.ndarray  # float64, NaN where the file has no value
    windows: np.ndarray  # int64, shape (k, 2): [first row, last row] of each window, in order

    @property
    def key(self) -> str:
        """The labels-file key, ``"<category>/<file>.csv"``."""
        return f"{self.category}/{self.name}"

    @property
    def rows(self) -> int:
        return len(self.values)


def window_rows(timestamps: np.ndarray, start: float, end: float) -> tuple[int, int]:
    """Inclusive row range of a window given by timestamps.

    Like NAB, a window starts at the first row carrying its start timestamp and ends at the first
    row from there carrying its end timestamp. When a timestamp is not in the file, the window
    covers the rows from the first one at or after ``start`` up to the last one before a row
    that passes ``end``.

    >>> ts = np.array([0.0, 60.0, 120.0, 120.0, 60.0, 180.0])  # a repeat and a step back
    >>> window_rows(ts, 60.0, 120.0), window_rows(ts, 90.0, 150.0)
    ((1, 2), (2, 4))
    """
    exact_start = np.flatnonzero(timestamps == start)
    if exact_start.size:
        first = int(exact_start[0])
    else:
        at_or_after = np.flatnonzero(timestamps >= start)
        if not at_or_after.size:
            raise ValueError("window starts after the last row")
        first = int(at_or_after[0])
    rest = timestamps[first:]
    exact_end = np.flatnonzero(rest == end)
    if exact_end.size:
        return first, first + int(exact_end[0])
    past = np.flatnonzero(rest > end)
    last = first + int(past[0]) - 1 if past.size else len(timestamps) - 1
    if last < first:
        raise ValueError("window ends before its first row")
    return first, last
