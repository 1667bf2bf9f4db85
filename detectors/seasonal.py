"""Daily-seasonal reference values for one variable, robust to yesterday's anomalies."""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

SECONDS_PER_DAY = 86_400.0
_MIN_POINTS_PER_DAY = 12
_MAX_POINTS_PER_DAY = 1_440


def points_per_day(median_step_seconds: float) -> int:
    """The daily period in points for a sampling step, or 0 when no daily cycle applies.

    Series sampled more coarsely than every two hours, or more finely than every minute, get no
    daily reference: too few points a day to compare, or too much memory for little gain.

    >>> points_per_day(300.0), points_per_day(3600.0), points_per_day(86400.0)
    (288, 24, 0)
    """
    if median_step_seconds <= 0.0:
        return 0
    period = round(SECONDS_PER_DAY / median_step_seconds)
    return period if _MIN_POINTS_PER_DAY <= period <= _MAX_POINTS_PER_DAY else 0


class SeasonalReference:
    """Same-time-of-day values of the last ``days`` days, one variable.

    Slots follow time, not point count: the detector calls ``skip(n)`` for the ``n`` sampling
    steps that a gap in the input left empty (and a missing point is pushed as NaN), so after a
    gap today's values still meet the same time of day on the previous days. Empty slots are
    left out of the references.

    ``compare(x)`` gives ``x`` minus the closest of those values: a single odd day in the history
    cannot echo into today (the other days still match), while a change against every recent
    day shows. ``expected()`` is their median, the value a user would call "usual".

    >>> ref = SeasonalReference(period=4, days=3)
    >>> for x in [1, 2, 3, 4] * 3 + [1, 9, 3, 4, 1]:  # a one-off 9 on the fourth day
    ...     ref.push(float(x))
    >>> ref.compare(2.0)  # (residual, expected): the next phase is the 9's, it does not echo
    (0.0, 2.0)
    >>> ref.skip(2)  # two empty steps: the next slot is the 4's phase, not the 3's
    >>> ref.compare(4.0)
    (0.0, 4.0)
    """

    __slots__ = ("_buffer", "_count", "_empty", "days", "period")

    def __init__(self, period: int, days: int = 3) -> None:
        self.period = period
        self.days = days
        # float32, as the forest itself stores values: 8 days of minutes cost 46 KB, not 92 KB.
        # Laid out phase by phase, so one phase's days are one slice (the hot path reads them).
        self._buffer = array("f", bytes(4 * period * days))
        self._count = 0
        self._empty = 0  # empty (NaN) slots in the buffer: none, the hot path skips the filter

    def _references(self) -> Sequence[float]:
        """The next slot's same-phase values of the last days, empty slots left out."""
        count = self._count
        start = (count % self.period) * self.days
        references = self._buffer[start : start + min(count // self.period, self.days)]
        return [v for v in references if v == v] if self._empty else references

    @property
    def ready(self) -> bool:
        return self._count >= self.period

    def compare(self, value: float) -> tuple[float, float] | None:
        """``(residual, expected)`` for ``value``; both read the references once (hot path).

        The residual is ``value`` minus the closest same-phase value of the last days, the
        expected value their median; ``None`` when every one of them is empty.
        """
        ordered = sorted(self._references())
        if not ordered:
            return None
        above = bisect_left(ordered, value)  # the first reference >= value
        if above == 0:
            residual = value - ordered[0]
        elif above == len(ordered):
            residual = value - ordered[-1]
        else:
            over, under = value - ordered[above], value - ordered[above - 1]
            residual = over if -over < under else under
        return residual, _sorted_median(ordered)

    def expected(self) -> float | None:
        """The median of the references, ``None`` when they are all empty."""
        ordered = sorted(self._references())
        return _sorted_median(ordered) if ordered else None

    def push(self, value: float) -> None:
        """Fill the next slot (NaN: the point is missing)."""
        count = self._count
        slot = (count % self.period) * self.days + (count // self.period) % self.days
        buffer = self._buffer
        if buffer[slot] != buffer[slot]:
            self._empty -= 1
        if value != value:
            self._empty += 1
        buffer[slot] = value
        self._count = count + 1

    def skip(self, steps: int) -> None:
        """Leave ``steps`` slots empty: the input had a gap."""
        for _ in range(min(steps, self.period * self.days)):
            self.push(math.nan)
        if steps > self.period * self.days:  # only the phase of the rest matters
            self._count += steps - self.period * self.days

    def to_state(self) -> tuple[dict[str, Any], bytes]:
        """Its scalars, and its buffer as float32 bytes (kept out of the snapshot's JSON: a
        minute series' 8 days are 46 KB raw, 92 KB as hex)."""
        return (
            {"period": self.period, "days": self.days, "count": self._count},
            self._buffer.tobytes(),
        )

    @classmethod
    def from_state(cls, state: dict[str, Any], buffer: bytes) -> SeasonalReference:
        """The reference ``to_state`` described.

        >>> ref = SeasonalReference(period=2, days=2)
        >>> for x in (1.0, math.nan, 3.0):
        ...     ref.push(x)
        >>> copy = SeasonalReference.from_state(*ref.to_state())
        >>> copy.compare(5.0) == ref.compare(5.0), copy._empty
        (True, 1)
        """
        reference = cls(state["period"], state["days"])
        if len(buffer) != 4 * reference.period * reference.days:
            raise ValueError(
                f"a seasonal buffer of {len(buffer)} bytes does not hold "
                f"{reference.period} x {reference.days} float32 slots"
            )
        reference._buffer = array("f", buffer)
        reference._count = state["count"]
        reference._empty = sum(1 for v in reference._buffer if v != v)
        return reference


def _sorted_median(ordered: Sequence[float]) -> float:
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return 0.5 * (ordered[middle - 1] + ordered[middle])
